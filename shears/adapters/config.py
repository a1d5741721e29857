"""Configurations of a super-adapter: which sub-adapter (rank per group) is active.

A *search space* maps each group name to its descending rank list; a *configuration* is a
plain ``dict[str, int]`` (group -> rank) that round-trips through JSON. Every function that
takes ``x`` accepts either a model carrying elastic adapters or a search space dict.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from numbers import Integral

import numpy as np
from torch import nn

from .layer import ElasticLoRALinear, validate_ranks

SearchSpace = dict[str, list[int]]
Config = dict[str, int]
ModelOrSpace = nn.Module | Mapping[str, list[int]]


def elastic_modules(model: nn.Module) -> Iterator[tuple[str, ElasticLoRALinear]]:
    """Yield ``(qualified_name, module)`` for every elastic adapter, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, ElasticLoRALinear):
            yield name, module


def group_of(name: str, module: ElasticLoRALinear) -> str:
    """The group key of an adapter: its ``group`` attribute, else its own qualified name."""
    return module.group if module.group is not None else name


def _grouped(model: nn.Module) -> dict[str, list[ElasticLoRALinear]]:
    groups: dict[str, list[ElasticLoRALinear]] = {}
    for name, module in elastic_modules(model):
        groups.setdefault(group_of(name, module), []).append(module)
    if not groups:
        raise ValueError("the model carries no elastic LoRA adapters; call add_elastic_lora first")
    return groups


def search_space(x: ModelOrSpace) -> SearchSpace:
    """Group -> descending rank list, read from a model or validated from a dict (a copy)."""
    if isinstance(x, nn.Module):
        space: SearchSpace = {}
        for group, modules in _grouped(x).items():
            for m in modules:
                if group in space and space[group] != list(m.ranks):
                    raise ValueError(
                        f"group {group!r} mixes rank lists {space[group]} and {list(m.ranks)}"
                    )
                space[group] = list(m.ranks)
        return space
    if not isinstance(x, Mapping):
        raise TypeError(f"expected a model or a search space dict, got {type(x).__name__}")
    if not x:
        raise ValueError("the search space is empty")
    space = {}
    for group, ranks in x.items():
        if not isinstance(group, str):
            raise TypeError(f"group keys must be strings, got {group!r}")
        try:
            ints = [_as_int(r, group) for r in ranks]
        except TypeError as e:
            raise ValueError(f"group {group!r}: ranks must be a list of ints, got {ranks!r}") from e
        try:
            space[group] = list(validate_ranks(ints))
        except ValueError as e:
            raise ValueError(f"group {group!r}: {e}") from e
    return space


def _as_int(rank: object, group: str) -> int:
    """numpy and Python ints become int; anything else (bool, float, str) is refused."""
    if isinstance(rank, bool) or not isinstance(rank, Integral):
        raise ValueError(f"group {group!r}: rank must be an int, got {rank!r}")
    return int(rank)


def get_config(model: nn.Module) -> Config:
    """The active configuration of ``model``: group -> active rank."""
    config: Config = {}
    for group, modules in _grouped(model).items():
        ranks = {m.active_rank for m in modules}
        if len(ranks) != 1:
            raise ValueError(f"adapters of group {group!r} disagree on the active rank: {ranks}")
        config[group] = ranks.pop()
    return config


def validate_config(space: SearchSpace, config: Mapping[str, int]) -> Config:
    """Check a (possibly partial) configuration against a space; return it with plain ints.

    Raises ``KeyError`` for an unknown group and ``ValueError`` for a rank outside its list.
    """
    out: Config = {}
    for group, rank in config.items():
        if group not in space:
            raise KeyError(f"unknown adapter group {group!r}; known groups: {list(space)[:8]}...")
        r = _as_int(rank, group)
        if r not in space[group]:
            raise ValueError(f"rank {rank!r} of group {group!r} is not in {space[group]}")
        out[group] = r
    return out


def set_config(model: nn.Module, config: Mapping[str, int]) -> None:
    """Activate a sub-adapter. Groups missing from ``config`` keep their current rank.

    The whole config is validated before anything changes, so a bad entry changes nothing.
    """
    groups = _grouped(model)
    config = validate_config(search_space(model), config)
    for group, rank in config.items():
        for m in groups[group]:
            m.active_rank = rank


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
    active = get_config(model)
    if config is not None:
        active.update(validate_config(search_space(model), config))
    return sum(
        active[group_of(name, m)] * (m.in_features + m.out_features)
        for name, m in elastic_modules(model)
    )
