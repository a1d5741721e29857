"""The search space seen as integer vectors: configuration <-> rank indices, neighbours.

Both searches work in *index space*: a configuration ``{group: rank}`` is encoded as the
vector of positions of each rank in its group's descending rank list (0 = r_max). A
neighbour moves one group one step along its list; crossover and mutation also act on
these indices, so every vector they produce decodes to a valid sub-adapter.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import numpy as np
from torch import nn

from shears.adapters import search_space

SearchSpace = dict[str, list[int]]
Config = dict[str, int]
Key = tuple[int, ...]

# Below this many configurations, a random *unvisited* one is drawn from the explicit list
# of the unvisited; above it, by rejection (the visited are then a vanishing fraction).
_ENUMERATE_BELOW = 4096
_REJECTION_TRIES = 10_000


def resolve(
    space_or_model: nn.Module | Mapping[str, list[int]],
) -> tuple[SearchSpace, nn.Module | None]:
    """The validated space (a copy, descending rank lists) and the model, if one was given."""
    model = space_or_model if isinstance(space_or_model, nn.Module) else None
    return search_space(space_or_model), model


def encode(space: SearchSpace, config: Mapping[str, int]) -> Key:
    """Rank indices of a *complete* configuration, in the space's group order."""
    missing = [g for g in space if g not in config]
    unknown = [g for g in config if g not in space]
    if missing or unknown:
        raise KeyError(f"configuration does not match the search space: missing groups "
                       f"{missing[:5]}, unknown groups {unknown[:5]}")
    key = []
    for group, ranks in space.items():
        rank = config[group]
        if rank not in ranks:
            raise ValueError(f"rank {rank!r} of group {group!r} is not in {ranks}")
        key.append(ranks.index(rank))
    return tuple(key)


def decode(space: SearchSpace, key: Key | np.ndarray) -> Config:
    """The configuration whose rank indices are ``key``."""
    return {g: int(ranks[int(i)]) for (g, ranks), i in zip(space.items(), key, strict=True)}


def sizes(space: SearchSpace) -> np.ndarray:
    """Number of ranks per group, in group order."""
    return np.array([len(r) for r in space.values()], dtype=np.int64)


def space_size(space: SearchSpace) -> int:
    """Number of distinct sub-adapters in the space."""
    return math.prod(len(r) for r in space.values())


def neighbour_keys(space: SearchSpace, key: Key) -> list[Key]:
    """Keys that move exactly one group one step up or down its rank list."""
    out = []
    for j, n in enumerate(sizes(space)):
        for step in (-1, 1):
            if 0 <= key[j] + step < n:
                out.append(key[:j] + (key[j] + step,) + key[j + 1:])
    return out


def random_unvisited(space: SearchSpace, visited: set[Key], rng: np.random.Generator) -> Key | None:
    """A uniformly random key not in ``visited``; ``None`` when the space is exhausted."""
    total = space_size(space)
    if len(visited) >= total:
        return None
    n = sizes(space)
    if total <= _ENUMERATE_BELOW:
        free = [k for k in itertools.product(*(range(int(m)) for m in n)) if k not in visited]
        return free[int(rng.integers(len(free)))]
    for _ in range(_REJECTION_TRIES):
        key = tuple(int(i) for i in rng.integers(0, n))
        if key not in visited:
            return key
    return None
