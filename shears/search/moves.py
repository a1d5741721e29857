"""The neighbourhood of a hill-climb: single moves, budget-keeping swaps, their order, restarts.

A *single* move takes one group one step up or down its rank list (at most 2 x groups of
them). Under an adapter-parameter budget (``max_params``) a climb at the budget's edge
cannot go up at all, so the neighbourhood also holds *swaps*: one group one step up and
another one step down (up to groups^2 of them, about 8,000 for SmolLM2's 90 groups). The
swaps are never listed: a random order draws them by index, and an estimated order walks
them best first with a heap over the sorted single-move changes.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from torch import nn

from shears.adapters import adapter_parameters, maximal_config

from .result import Config, SearchSpace
from .space import Key, decode, neighbour_keys, random_unvisited, sizes, space_size

Estimate = Callable[[Config], float]

_ENUMERATE_BELOW = 4096  # as space.random_unvisited: list the feasible keys of small spaces
_RESTART_TRIES = 10_000


class ParamTable:
    """Adapter parameters of a key in O(groups).

    ``adapter_parameters`` is a sum over groups of rank x width, so the parameters of any
    key are those of the maximal sub-adapter plus one change per group away from r_max;
    the table holds these changes, measured with ``adapter_parameters`` itself.
    """

    def __init__(self, model: nn.Module, space: SearchSpace) -> None:
        maximal = maximal_config(space)
        self.base = adapter_parameters(model, maximal)
        self.delta = [np.array([adapter_parameters(model, {**maximal, g: r}) - self.base
                                for r in ranks], dtype=np.int64) for g, ranks in space.items()]

    def __call__(self, key: Key) -> int:
        return self.base + sum(int(d[i]) for d, i in zip(self.delta, key, strict=True))

    def change(self, j: int, old: int, new: int) -> int:
        """Parameters gained when group ``j`` moves from rank index ``old`` to ``new``."""
        return int(self.delta[j][new] - self.delta[j][old])


class Neighbourhood:
    """The moves around ``key``: single moves, plus swaps when there is a budget.

    Every key it yields keeps ``table(key) <= max_params`` (a single move up that would
    break the budget is left out; a swap is kept only when its net change fits).
    """

    def __init__(self, space: SearchSpace, key: Key, table: ParamTable | None = None,
                 max_params: int | None = None) -> None:
        self.space, self.key, self.table, self.max_params = space, key, table, max_params
        n = sizes(space)
        self.singles = [k for k in neighbour_keys(space, key) if self._fits(k)]
        self.swaps = max_params is not None
        # groups that can move one step up (towards r_max, index - 1) or down (index + 1)
        self.ups = [j for j in range(len(key)) if key[j] > 0] if self.swaps else []
        self.downs = [j for j in range(len(key)) if key[j] < n[j] - 1] if self.swaps else []
        self.params = table(key) if table is not None else None

    def _fits(self, key: Key) -> bool:
        return self.max_params is None or self.table(key) <= self.max_params

    def swap(self, up: int, down: int) -> Key | None:
        """``key`` with group ``up`` one step up and ``down`` one step down, if it fits."""
        if up == down:
            return None
        k = self.key
        gain = (self.table.change(up, k[up], k[up] - 1)
                + self.table.change(down, k[down], k[down] + 1))
        if self.params + gain > self.max_params:
            return None
        out = list(k)
        out[up] -= 1
        out[down] += 1
        return tuple(out)

    def is_move(self, other: Key) -> bool:
        """Whether ``other`` is one of the moves (a single move or, with a budget, a swap)."""
        diff = [(j, b - a) for j, (a, b) in enumerate(zip(self.key, other, strict=True)) if a != b]
        if len(diff) == 1 and abs(diff[0][1]) == 1:
            return self._fits(other)
        if self.swaps and len(diff) == 2 and sorted(d for _, d in diff) == [-1, 1]:
            return self._fits(other)
        return False

    def random_order(self, rng: np.random.Generator) -> Iterator[Key]:
        """Every move once, in a seeded random order, drawn lazily.

        The permutation is drawn now (so the generator's state does not depend on how far
        the caller reads); without swaps it is the permutation of the single moves alone.
        """
        singles = self.singles
        perm = rng.permutation(len(singles) + len(self.ups) * len(self.downs))
        return self._by_index(perm)

    def _by_index(self, perm: np.ndarray) -> Iterator[Key]:
        s, d = len(self.singles), max(len(self.downs), 1)
        for i in perm:
            if i < s:
                yield self.singles[i]
                continue
            u, v = divmod(int(i) - s, d)
            key = self.swap(self.ups[u], self.downs[v])
            if key is not None:
                yield key

    def estimated_order(self, estimate: Estimate, maximize: bool) -> Iterator[Key]:
        """Every move once, most promising first by ``estimate`` (ties: single moves first,
        then the space's group order).

        Single moves are ordered by their estimate. A swap is ordered by the estimate at
        ``key`` plus the changes its two single moves predict, which is its estimate when
        the estimate is additive over groups (as ``rank_sensitivity``'s is); so the best
        swaps are the best move up combined with the best move down, found with a heap
        without listing the others.
        """
        sign = -1.0 if maximize else 1.0

        values: dict[Key, float] = {}

        def value(k: Key) -> float:  # each key estimated once: a single move is also a swap's half
            if k not in values:
                v = sign * float(estimate(decode(self.space, k)))
                values[k] = math.inf if math.isnan(v) else v  # an unknown estimate goes last
            return values[k]

        singles = [(value(k), 0, i, k) for i, k in enumerate(self.singles)]
        singles.sort(key=lambda t: t[:3])
        if not self.swaps or not self.ups or not self.downs:
            yield from (k for *_, k in singles)
            return
        here = value(self.key)
        up = sorted((value(_step(self.key, j, -1)) - here, j) for j in self.ups)
        down = sorted((value(_step(self.key, j, 1)) - here, j) for j in self.downs)
        swaps = ((here + s, 1, n, key) for n, (s, key) in enumerate(self._pairs(up, down)))
        for *_, k in heapq.merge(singles, swaps, key=lambda t: t[:3]):
            yield k

    def _pairs(self, up: list, down: list) -> Iterator[tuple[float, Key]]:
        """Fitting swaps by increasing ``up change + down change`` (k smallest pair sums)."""
        heap = [(up[0][0] + down[0][0], 0, 0)]
        seen = {(0, 0)}
        while heap:
            total, a, b = heapq.heappop(heap)
            key = self.swap(up[a][1], down[b][1])
            if key is not None:
                yield total, key
            for na, nb in ((a + 1, b), (a, b + 1)):
                if na < len(up) and nb < len(down) and (na, nb) not in seen:
                    seen.add((na, nb))
                    heapq.heappush(heap, (up[na][0] + down[nb][0], na, nb))


def _step(key: Key, j: int, step: int) -> Key:
    return key[:j] + (key[j] + step,) + key[j + 1:]


def known_moves(nearby: Neighbourhood, visited: Iterable[Key]) -> list[Key]:
    """The visited keys that are moves of ``nearby``: single moves in their canonical order,
    then swaps in the order they were visited."""
    visited = list(visited)
    seen = set(visited)
    singles = [k for k in nearby.singles if k in seen]
    if not nearby.swaps:
        return singles
    return singles + [k for k in visited if k not in singles and nearby.is_move(k)]


def restart(space: SearchSpace, visited: set[Key], rng: np.random.Generator,
            table: ParamTable | None = None, max_params: int | None = None) -> Key | None:
    """A random unvisited key, within ``max_params`` when given; ``None`` when none is left.

    Without a budget: uniform (:func:`random_unvisited`). With one, small spaces draw
    uniformly from the fitting unvisited keys; large ones draw a uniform key and, while
    it is over the budget, move a random group one step down (the minimal sub-adapter
    fits, so this ends).
    """
    if max_params is None:
        return random_unvisited(space, visited, rng)
    n = sizes(space)
    if space_size(space) <= _ENUMERATE_BELOW:
        free = [k for k in itertools.product(*(range(int(m)) for m in n))
                if k not in visited and table(k) <= max_params]
        return free[int(rng.integers(len(free)))] if free else None
    for _ in range(_RESTART_TRIES):
        key = [int(i) for i in rng.integers(0, n)]
        while table(tuple(key)) > max_params:
            lower = [j for j in range(len(key)) if key[j] < n[j] - 1]
            j = lower[int(rng.integers(len(lower)))]
            key[j] += 1
        if tuple(key) not in visited:
            return tuple(key)
    return None
