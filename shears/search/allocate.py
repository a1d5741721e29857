"""The sub-adapter of least estimated loss under an adapter-parameter budget, and the front.

With a :class:`~shears.search.RankSensitivity` the estimated loss of a configuration is a
sum over groups, and so is its size (``adapter_parameters``: r * (in + out) summed over a
group's adapters). Picking one rank per group to minimise the one under a bound on the
other is a multiple-choice knapsack. It is solved exactly by dynamic programming over the
groups whose states are partial configurations keyed by their exact integer cost: a state
that costs no less and is estimated no better than another is dropped (no completion can
make it win), so what survives every group is the whole estimated front, one configuration
per budget, and nothing is rounded to a cost grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from torch import nn

from shears.adapters import elastic_index

from .result import Config
from .sensitivity import RankSensitivity
from .space import resolve

Costs = Mapping[str, Mapping[int, int]]  # group -> {rank: cost}
Deltas = Mapping[str, Mapping[int, float]]  # group -> {rank: estimated loss change}


class FrontPoint(NamedTuple):
    """One configuration of the estimated front."""

    params: int
    estimated_loss: float
    config: Config


def rank_costs(model: nn.Module) -> dict[str, dict[int, int]]:
    """Group -> {rank: adapter parameters of the group at that rank}: r * sum of (in + out)
    over the group's adapters, as :func:`adapter_parameters` counts."""
    index = elastic_index(model)
    width = {g: sum(m.in_features + m.out_features for m in ms) for g, ms in index.groups.items()}
    return {g: {r: r * width[g] for r in ranks} for g, ranks in index.space.items()}


def estimated_front(space_or_model: nn.Module | Mapping[str, list[int]],
                    sensitivity: RankSensitivity | Deltas, costs: Costs | None = None,
                    ) -> list[FrontPoint]:
    """Every configuration that no other beats on both estimated loss and cost.

    Args:
        space_or_model: a model with elastic adapters (costs: its adapter parameters) or a
            search space (then ``costs`` is required).
        sensitivity: a :class:`RankSensitivity`, or its ``deltas`` (group -> {rank:
            change}; the estimated loss is then the sum of the changes).
        costs: group -> {rank: non-negative int cost}; default :func:`rank_costs` of the
            model.

    Returns:
        ``FrontPoint(params, estimated_loss, config)`` sorted by ``params``, the estimated
        loss strictly decreasing. Ties: at equal estimated loss the cheaper configuration;
        at equal cost too, the one with the larger ranks in the earlier groups.
    """
    space, model = resolve(space_or_model)
    if costs is None:
        if model is None:
            raise ValueError("a bare search space needs costs= (group -> {rank: cost}); "
                             "pass the model to count adapter parameters")
        costs = rank_costs(model)
    deltas, base = _deltas_of(sensitivity)
    cost_table, delta_table = _tables(space, costs, deltas)
    # States: partial configurations over the groups so far, as parallel arrays. ``order`` is
    # each state's rank among them by rank-index key, the tie-break of last resort.
    cost = np.zeros(1, dtype=np.int64)
    value = np.zeros(1, dtype=np.float64)
    order = np.zeros(1, dtype=np.int64)
    trail: list[tuple[np.ndarray, np.ndarray]] = []  # per group: parent state, rank index
    for c, d in zip(cost_table, delta_table, strict=True):
        k = len(c)
        parent = np.repeat(np.arange(len(cost)), k)
        choice = np.tile(np.arange(k), len(cost))
        cand_cost, cand_value = cost[parent] + c[choice], value[parent] + d[choice]
        tie = order[parent] * k + choice  # lexicographic on (parent key, this rank index)
        sort = np.lexsort((tie, cand_value, cand_cost))  # by cost, then value, then key
        sorted_value = cand_value[sort]
        keep = np.ones(len(sort), dtype=bool)
        # kept: strictly better than everything cheaper or as cheap that sorts before it
        keep[1:] = sorted_value[1:] < np.minimum.accumulate(sorted_value)[:-1]
        kept = sort[keep]
        cost, value = cand_cost[kept], cand_value[kept]
        order = np.argsort(np.argsort(tie[kept], kind="stable"), kind="stable")
        trail.append((parent[kept], choice[kept]))
    groups = list(space)
    front = []
    for s in range(len(cost)):
        config, state = {}, s
        for j in range(len(groups) - 1, -1, -1):
            parent, choice = trail[j]
            config[groups[j]] = space[groups[j]][int(choice[state])]
            state = int(parent[state])
        front.append(FrontPoint(int(cost[s]), base + float(value[s]),
                                {g: config[g] for g in groups}))
    return front


def allocate(space_or_model: nn.Module | Mapping[str, list[int]],
             sensitivity: RankSensitivity | Deltas, max_params: int,
             costs: Costs | None = None) -> Config:
    """The configuration of least estimated loss whose cost is at most ``max_params``.

    Exact (every configuration is considered; see :func:`estimated_front`, which takes the
    same arguments and breaks ties the same way). Raises ``ValueError`` when even the
    cheapest configuration costs more than ``max_params``.
    """
    front = estimated_front(space_or_model, sensitivity, costs)
    fits = [p for p in front if p.params <= max_params]
    if not fits:
        raise ValueError(f"no sub-adapter fits max_params={max_params}: the cheapest costs "
                         f"{front[0].params:,}")
    return dict(fits[-1].config)


def _deltas_of(sensitivity: RankSensitivity | Deltas) -> tuple[Deltas, float]:
    if isinstance(sensitivity, RankSensitivity):
        return sensitivity.deltas, sensitivity.base_loss
    return sensitivity, 0.0


def _tables(space: dict[str, list[int]], costs: Costs, deltas: Deltas):
    """Per group, the (k,) int64 costs and float64 changes of its ranks, in rank order;
    checked to cover the space, with integral costs >= 0 and no NaN change."""
    cost_table, delta_table = [], []
    for g, ranks in space.items():
        for name, table in (("costs", costs), ("sensitivity", deltas)):
            if g not in table:
                raise KeyError(f"{name} has no entry for group {g!r}")
            missing = [r for r in ranks if r not in table[g]]
            if missing:
                raise ValueError(f"{name} of group {g!r} lacks ranks {missing}")
        c = [costs[g][r] for r in ranks]
        if any(isinstance(x, bool) or int(x) != x or x < 0 for x in c):
            raise ValueError(f"costs of group {g!r} must be integers >= 0, got {c}")
        d = [float(deltas[g][r]) for r in ranks]
        if any(math.isnan(x) for x in d):
            raise ValueError(f"the sensitivity of group {g!r} has NaN changes: {d}")
        cost_table.append(np.array(c, dtype=np.int64))
        delta_table.append(np.array(d, dtype=np.float64))
    return cost_table, delta_table
