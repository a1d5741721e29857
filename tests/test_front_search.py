"""front_search: the race's schedule and accounting, the chunked judge against evaluate_loss,
and the whole search on a tiny model against brute force over its space."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from test_sensitivity import batches, rows
from tiny import make_tiny, randomize_adapters

from shears.adapters import add_elastic_lora, set_config
from shears.evaluation import evaluate_loss
from shears.search import (
    RankSensitivity,
    adapter_parameters,
    front_search,
    heuristic_config,
    make_chunked_evaluator,
    maximal_config,
    search_space,
)
from shears.search.front_search import halving_schedule


@pytest.fixture(scope="module")
def model():
    model = add_elastic_lora(make_tiny("llama", seed=0), ["q_proj", "v_proj", "up_proj"],
                             ranks=(8, 4, 2))
    return randomize_adapters(model, seed=1, a_scale=None, b_scale=0.3)


def every_config(space):
    for ranks in itertools.product(*space.values()):
        yield dict(zip(space, ranks, strict=True))


class TableJudge:
    """A chunked judge whose every chunk mean is the configuration's value in ``table``
    (noise-free, so a race is exact), counting what it is asked."""

    def __init__(self, table: dict, costs: list[float]):
        self.table, self.chunk_costs, self.calls = table, costs, []

    def chunk(self, config, i):
        self.calls.append((tuple(config.values()), i))
        w = 10.0 * self.chunk_costs[i]
        return self.table[tuple(config.values())] * w, w

    def __call__(self, config):
        return self.table[tuple(config.values())]


def table_for(space, seed):
    rng = np.random.default_rng(seed)
    return {tuple(c.values()): float(rng.normal()) for c in every_config(space)}


def sensitivity_of(space, table):
    """An additive fit of the table from the maximal sub-adapter: one-group changes."""
    top = maximal_config(space)
    base = table[tuple(top.values())]
    deltas = {g: {r: table[tuple({**top, g: r}.values())] - base for r in ranks}
              for g, ranks in space.items()}
    return RankSensitivity(anchor=top, deltas=deltas, base_loss=base, tokens=1)


def test_halving_schedule():
    assert halving_schedule(16, 2, 8) == [(1, 8), (2, 4), (4, 2), (8, 2)]
    assert halving_schedule(32, 2, 8) == [(1, 16), (1, 8), (2, 4), (4, 2), (8, 2)]
    assert halving_schedule(3, 2, 4) == [(2, 2), (4, 2)]
    assert halving_schedule(2, 2, 4) == [(4, 2)]
    assert halving_schedule(0, 2, 4) == [(4, 0)]
    assert halving_schedule(5, 1, 1) == [(1, 3), (1, 2), (1, 1), (1, 1)]


def test_chunked_evaluator_is_evaluate_loss_over_the_same_records(model):
    records = rows(10)
    judge = make_chunked_evaluator(model, batches(records, 2), chunks=3)
    assert len(judge.chunks) == 3 and math.isclose(sum(judge.chunk_costs), 1.0)
    lengths = [sum(len(records[j]["input_ids"]) for b in part for j in range(2 * b, 2 * b + 2))
               for part in judge.chunks]
    assert judge.chunk_costs == pytest.approx([n / sum(lengths) for n in lengths])
    for config in (maximal_config(model), heuristic_config(model)):
        set_config(model, config)
        expected = evaluate_loss(model, records, batch_size=4)
        set_config(model, maximal_config(model))
        assert judge(config) == pytest.approx(expected, rel=1e-6)
        parts = [judge.chunk(config, i) for i in range(3)]
        assert sum(c for _, c in parts) == sum(sum(t != -100 for t in r["labels"][1:])
                                               for r in records)


@pytest.mark.parametrize("seed", range(4))
def test_race_spends_within_budget_and_keeps_the_best_candidates(model, seed):
    space = search_space(model)
    table = table_for(space, seed)
    judge = TableJudge(table, [0.125] * 8)
    sens = sensitivity_of(space, table)
    limit = adapter_parameters(model, heuristic_config(model))
    result = front_search(model, judge, budget=4, max_params=limit, sensitivity=sens,
                          race_share=1.0, progress=False)  # all of it to the race: no climb
    spent = sum(judge.chunk_costs[i] for _, i in set(judge.calls))
    assert len(judge.calls) == len(set(judge.calls))  # no chunk scored twice
    assert result.settings["spent"] == pytest.approx(spent) and spent <= 4 + 1e-9
    assert spent > 3  # the race used what it was given
    assert result.history[0].config == heuristic_config(model)
    assert result.best_score <= table[tuple(heuristic_config(model).values())]
    assert all(e.params <= limit for e in result.history)
    assert all(e.score == pytest.approx(table[tuple(e.config.values())]) for e in result.history)
    # Noise-free chunks: the finalists are the two best candidates that entered the race.
    raced = [r["config"] for r in result.settings["race"] if r["round"] == 0]
    assert len(raced) == result.settings["candidates"], result.settings
    assert len(raced) >= min(4, result.settings["front"])
    best_two = sorted(raced, key=lambda c: table[tuple(c.values())])[:2]
    assert [e.config for e in result.history[1:]] == best_two


def test_plain_judge_races_in_full_evaluations(model):
    space = search_space(model)
    table = table_for(space, 7)
    calls = []

    def evaluate(config):
        calls.append(dict(config))
        return table[tuple(config.values())]

    result = front_search(model, evaluate, budget=5, sensitivity=sensitivity_of(space, table),
                          race_share=1.0, progress=False)
    assert len(calls) == 5 == result.settings["spent"]  # heuristic + 4 candidates
    assert calls[0] == heuristic_config(model)
    assert result.best_score == min(table[tuple(c.values())] for c in calls)


def test_needs_a_sensitivity_unless_the_judge_has_batches(model):
    with pytest.raises(ValueError, match="sensitivity="):
        front_search(model, lambda c: 0.0, budget=2, progress=False)
    with pytest.raises(ValueError, match="budget"):
        front_search(model, lambda c: 0.0, budget=0.5, progress=False)


def test_sensitivity_from_the_chunked_judges_batches(model):
    judge = make_chunked_evaluator(model, batches(rows(8), 2))
    torch.manual_seed(0)
    result = front_search(model, judge, budget=3, race_share=1.0, progress=False)
    assert result.settings["sensitivity_seconds"] > 0
    assert result.settings["spent"] <= 3 + 1e-9
    assert result.best_score <= result.settings["heuristic"]


@pytest.mark.parametrize("seed", range(3))
def test_climb_refines_within_budget_and_max_params_deterministically(model, seed):
    space = search_space(model)
    table = table_for(space, 10 + seed)
    limit = adapter_parameters(model, heuristic_config(model))

    def run():
        judge = TableJudge(table, [0.25] * 4)
        result = front_search(model, judge, budget=12, max_params=limit,
                              sensitivity=sensitivity_of(space, table), seed=seed,
                              progress=False)
        return judge, result

    judge, result = run()
    spent = sum(judge.chunk_costs[i] for _, i in judge.calls)
    assert len(judge.calls) == len(set(judge.calls))
    assert result.settings["spent"] == pytest.approx(spent) and 11 < spent <= 12 + 1e-9
    configs = [tuple(e.config.values()) for e in result.history]
    assert len(configs) == len(set(configs))
    finals = 1 + result.settings["finalists"]
    assert len(result.history) > finals  # the climb evaluated more after the race
    assert "climb" in result.settings and result.settings["climb"]["estimate"]
    assert all(e.params <= limit for e in result.history)
    assert result.best_score <= min(e.score for e in result.history[:finals])
    assert result.best_score <= table[tuple(heuristic_config(model).values())]
    _, again = run()
    assert [e.config for e in again.history] == [e.config for e in result.history]


def test_a_budget_beyond_the_feasible_space_finds_the_brute_force_best():
    small = add_elastic_lora(make_tiny("llama", seed=0), ["q_proj", "up_proj"],
                             ranks=(8, 4, 2), groups="layer")  # 2 groups: 9 configurations
    space = search_space(small)
    table = table_for(space, 3)
    limit = adapter_parameters(small, heuristic_config(small))
    feasible = [c for c in every_config(space) if adapter_parameters(small, c) <= limit]
    judge = TableJudge(table, [0.5, 0.5])
    result = front_search(small, judge, budget=40, max_params=limit,
                          sensitivity=sensitivity_of(space, table), progress=False)
    assert sorted(tuple(e.config.values()) for e in result.history) == sorted(
        tuple(c.values()) for c in feasible)  # all of it, once, then it stopped
    assert result.best_score == pytest.approx(min(table[tuple(c.values())] for c in feasible))
    assert result.settings["spent"] <= len(feasible) + 1e-9
