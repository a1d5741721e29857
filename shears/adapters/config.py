"""Configurations of a super-adapter: which sub-adapter (rank per group) is active.

A *search space* maps each group name to its descending rank list; a *configuration* is a
plain ``dict[str, int]`` (group -> rank) that round-trips through JSON. Every function that
takes ``x`` accepts either a model carrying elastic adapters or a search space dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import numpy as np
from torch import nn

from .index import Config, SearchSpace, _as_int, elastic_index, validate_config
from .layer import validate_ranks

ModelOrSpace = nn.Module | Mapping[str, list[int]]


def search_space(x: ModelOrSpace) -> SearchSpace:
    """Group -> descending rank list, read from a model or validated from a dict (a copy)."""
    if isinstance(x, nn.Module):
        return {group: list(ranks) for group, ranks in elastic_index(x).space.items()}
    if not isinstance(x, Mapping):
        raise TypeError(f"expected a model or a search space dict, got {type(x).__name__}")
    if not x:
        raise ValueError("the search space is empty")
    space = {}
    for group, ranks in x.items():
        if not isinstance(group, str):
            raise TypeError(f"group keys must be strings, got {group!r}")
        space[group] = _checked_ranks(group, ranks)
    return space


def _checked_ranks(group: str, ranks: object) -> list[int]:
    """One group's rank list, validated and descending (memoised: samplers call this per step)."""
    if isinstance(ranks, (list, tuple)) and ranks and all(type(r) is int for r in ranks):
        try:
            return list(_valid_int_ranks(tuple(ranks)))
        except ValueError as e:
            raise ValueError(f"group {group!r}: {e}") from e
    try:
        ints = [_as_int(r, group) for r in ranks]
    except TypeError as e:
        raise ValueError(f"group {group!r}: ranks must be a list of ints, got {ranks!r}") from e
    try:
        return list(validate_ranks(ints))
    except ValueError as e:
        raise ValueError(f"group {group!r}: {e}") from e


@lru_cache(maxsize=1024)
def _valid_int_ranks(ranks: tuple[int, ...]) -> tuple[int, ...]:
    return validate_ranks(ranks)  # a refused list raises, and is not cached


def get_config(model: nn.Module) -> Config:
    """The active configuration of ``model``: group -> active rank."""
    return elastic_index(model).get()


def set_config(model: nn.Module, config: Mapping[str, int]) -> None:
    """Activate a sub-adapter. Groups missing from ``config`` keep their current rank.

    The whole config is validated before anything changes, so a bad entry changes nothing.
    Cheap: the model's ``ElasticIndex`` is built once and reused (see adapters/index.py).
    """
    elastic_index(model).set(config)


def maximal_config(x: ModelOrSpace) -> Config:
    """The largest sub-adapter: every group at its r_max (the whole super-adapter)."""
    return {g: ranks[0] for g, ranks in search_space(x).items()}


def minimal_config(x: ModelOrSpace) -> Config:
    """The smallest sub-adapter: every group at its lowest rank."""
    return {g: ranks[-1] for g, ranks in search_space(x).items()}


def heuristic_config(x: ModelOrSpace) -> Config:
    """Shears' O(1) heuristic: the middle rank ``ranks[(n - 1) // 2]`` ([32, 24, 16] -> 24)."""
    return {g: ranks[(len(ranks) - 1) // 2] for g, ranks in search_space(x).items()}


def random_config(x: ModelOrSpace, rng: np.random.Generator | int | None = None) -> Config:
    """Each group draws its rank uniformly; ``rng`` is a numpy Generator or an int seed.

    Groups draw in the space's order, so equal generators give equal configurations.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    return {g: int(ranks[rng.integers(len(ranks))]) for g, ranks in search_space(x).items()}


def adapter_parameters(model: nn.Module, config: Mapping[str, int] | None = None) -> int:
    """Trainable adapter parameters active under ``config``: sum of r * (in + out).

    ``None`` means the current configuration; a partial config fills the missing groups
    with their current ranks. This is the cost axis of the sub-adapter search.
    """
    index = elastic_index(model)
    active = index.get()
    if config is not None:
        active.update(validate_config(index.space, config))
    return sum(
        active[group] * sum(m.in_features + m.out_features for m in modules)
        for group, modules in index.groups.items()
    )
