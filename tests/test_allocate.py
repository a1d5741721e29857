"""allocate and estimated_front against brute force over every configuration of small spaces."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from tiny import make_tiny

from shears.adapters import add_elastic_lora
from shears.search import (
    RankSensitivity,
    adapter_parameters,
    allocate,
    estimated_front,
    maximal_config,
    minimal_config,
    rank_costs,
    search_space,
)


def every_config(space):
    for ranks in itertools.product(*space.values()):
        yield dict(zip(space, ranks, strict=True))


def brute(space, deltas, costs):
    """(cost, value, key, config) of every configuration, value summed group by group."""
    out = []
    for config in every_config(space):
        value = sum(deltas[g][r] for g, r in config.items())
        cost = sum(costs[g][r] for g, r in config.items())
        key = tuple(space[g].index(r) for g, r in config.items())
        out.append((cost, value, key, config))
    return out


def brute_best(table, budget):
    """Least value within the budget; then the cheaper; then the smaller rank-index key."""
    feasible = [t for t in table if t[0] <= budget]
    return min(feasible, key=lambda t: (t[1], t[0], t[2]))[3] if feasible else None


def brute_front(table):
    """For every budget (distinct cost), its best; the points whose value improves."""
    front, best = [], np.inf
    for cost in sorted({t[0] for t in table}):
        config = brute_best(table, cost)
        value = next(t[1] for t in table if t[3] == config)
        if value < best:
            front.append((cost, value, config))
            best = value
    return front


def random_problem(seed, groups=4, integer=False):
    rng = np.random.default_rng(seed)
    space = {f"g{i}": sorted(rng.choice([2, 4, 6, 8, 12, 16], size=int(rng.integers(2, 4)),
                                        replace=False).tolist(), reverse=True)
             for i in range(groups)}
    width = {g: int(rng.integers(1, 5)) for g in space}
    costs = {g: {r: r * width[g] for r in ranks} for g, ranks in space.items()}
    draw = (lambda: float(rng.integers(-3, 3))) if integer else (lambda: float(rng.normal()))
    deltas = {g: {r: draw() for r in ranks} for g, ranks in space.items()}
    return space, deltas, costs


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("integer", [False, True], ids=["real", "ties"])
def test_allocate_matches_brute_force_at_every_budget(seed, integer):
    space, deltas, costs = random_problem(seed, integer=integer)
    table = brute(space, deltas, costs)
    cheapest = min(t[0] for t in table)
    for budget in range(cheapest, max(t[0] for t in table) + 2):
        assert allocate(space, deltas, budget, costs) == brute_best(table, budget), budget


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("integer", [False, True], ids=["real", "ties"])
def test_front_is_the_brute_force_front(seed, integer):
    space, deltas, costs = random_problem(seed, groups=5, integer=integer)
    front = estimated_front(space, deltas, costs)
    expected = brute_front(brute(space, deltas, costs))
    assert [(p.params, p.estimated_loss, p.config) for p in front] == expected
    assert all(a.estimated_loss > b.estimated_loss for a, b in zip(front, front[1:], strict=False))


def test_ties_prefer_the_cheaper_then_the_larger_ranks_first():
    space = {"a": [8, 4], "b": [8, 4]}
    costs = {"a": {8: 8, 4: 4}, "b": {8: 8, 4: 4}}
    flat = {"a": {8: 0.0, 4: 0.0}, "b": {8: 0.0, 4: 0.0}}
    assert allocate(space, flat, 100, costs) == {"a": 4, "b": 4}  # equal loss: cheapest
    swap = {"a": {8: -1.0, 4: 0.0}, "b": {8: -1.0, 4: 0.0}}
    # budget 12 fits (8, 4) or (4, 8), equal in loss and cost: larger rank in the first group
    assert allocate(space, swap, 12, costs) == {"a": 8, "b": 4}
    assert [p.params for p in estimated_front(space, swap, costs)] == [8, 12, 16]


def test_infeasible_budget_and_bad_inputs_are_refused():
    space, deltas, costs = random_problem(0)
    cheapest = min(t[0] for t in brute(space, deltas, costs))
    with pytest.raises(ValueError, match=f"no sub-adapter fits max_params={cheapest - 1}: "
                                         f"the cheapest costs {cheapest}"):
        allocate(space, deltas, cheapest - 1, costs)
    with pytest.raises(ValueError, match="costs="):
        allocate(space, deltas, 10**6)
    g = next(iter(space))
    with pytest.raises(ValueError, match="lacks ranks"):
        allocate(space, {**deltas, g: {space[g][0]: 0.0}}, 10**6, costs)
    with pytest.raises(ValueError, match="integers >= 0"):
        allocate(space, deltas, 10**6, {**costs, g: {r: 0.5 for r in space[g]}})
    with pytest.raises(ValueError, match="NaN"):
        allocate(space, {**deltas, g: {r: float("nan") for r in space[g]}}, 10**6, costs)
    with pytest.raises(KeyError, match="no entry"):
        allocate(space, {k: v for k, v in deltas.items() if k != g}, 10**6, costs)


def test_on_a_model_costs_are_adapter_parameters_and_the_estimate_is_the_sensitivitys():
    model = add_elastic_lora(make_tiny("llama"), ["q_proj", "k_proj", "v_proj", "up_proj",
                                                  "down_proj"], ranks=(8, 4, 2), groups="qkv")
    space = search_space(model)
    rng = np.random.default_rng(0)
    deltas = {g: {r: 0.0 if r == 8 else float(rng.uniform(0, 1) * (8 - r)) for r in ranks}
              for g, ranks in space.items()}
    sens = RankSensitivity(anchor=maximal_config(model), deltas=deltas, base_loss=2.5, tokens=10)
    costs = rank_costs(model)
    for config in every_config(space):
        assert sum(costs[g][r] for g, r in config.items()) == adapter_parameters(model, config)
    front = estimated_front(model, sens)
    assert front[0].config == minimal_config(model) and front[-1].config == maximal_config(model)
    for p in front:
        assert p.params == adapter_parameters(model, p.config)
        assert p.estimated_loss == sens.estimate(p.config)
    table = brute(space, deltas, costs)
    budget = adapter_parameters(model, {g: 4 for g in space})
    assert allocate(model, sens, budget) == brute_best(table, budget)
    assert torch.is_grad_enabled()  # nothing here touches autograd state
