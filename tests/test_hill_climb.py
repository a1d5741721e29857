"""hill_climb on synthetic objectives with known optima, and its budget bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
from test_search_objectives import (
    SMALL,
    SPACE,
    TARGET,
    Counting,
    all_configs,
    brute_force_best,
    deceptive,
    idx,
    plateau,
    random_table,
    separable,
)

from shears.search import heuristic_config, hill_climb
from shears.search.space import decode, space_size

OPTIMUM = decode(SPACE, TARGET)


def l1(space, a: dict, b: dict) -> int:
    return sum(abs(x - y) for x, y in zip(idx(space, a), idx(space, b), strict=True))


def test_separable_optimum_reached_from_the_heuristic_in_one_climb():
    f = Counting(separable)
    result = hill_climb(SPACE, f, budget=200, progress=False)
    assert result.best_config == OPTIMUM and result.best_score == 0.0
    assert result.history[0].config == heuristic_config(SPACE)
    # One climb of 6 steps, each evaluating at most the 2 * 8 neighbours: no restart needed
    # to get there, so the optimum appears within the first 1 + 6 * 16 evaluations.
    first = next(i for i, c in enumerate(f.calls) if c == OPTIMUM)
    assert first < 1 + 6 * 16


@pytest.mark.parametrize("seed", range(5))
def test_deceptive_optimum_reached_after_restarts(seed):
    result = hill_climb(SPACE, deceptive, budget=250, seed=seed, progress=False)
    assert result.best_config == OPTIMUM
    # the first climb ends on the decoy, so the optimum needed a restart
    assert max(e.score for e in result.history[:20]) == 8.0


@pytest.mark.parametrize("seed", range(5))
def test_plateau_optimum_reached_by_restarts_off_the_flat(seed):
    result = hill_climb(SPACE, plateau, budget=600, seed=seed, progress=False)
    assert result.best_config == OPTIMUM


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("maximize", [True, False])
def test_never_worse_than_start_and_returns_best_ever_seen(seed, maximize):
    f = random_table(SMALL, seed)
    start = {"q": 24, "v": 16, "up": 2}
    result = hill_climb(SMALL, f, start=start, budget=12, seed=seed, maximize=maximize,
                        progress=False)
    scores = [e.score for e in result.history]
    assert result.history[0].config == start
    best = max(scores) if maximize else min(scores)
    assert result.best_score == best
    assert f(result.best_config) == best
    assert (best >= f(start)) if maximize else (best <= f(start))


@pytest.mark.parametrize("budget", [1, 2, 7, 33])
def test_budget_respected_exactly_and_nothing_evaluated_twice(budget):
    f = Counting(random_table(SMALL, 0))
    result = hill_climb(SMALL, f, budget=budget, progress=False)
    assert len(f.calls) == budget == len(result.history) == f.distinct()
    assert [e.config for e in result.history] == f.calls


def test_budget_beyond_the_space_visits_every_configuration_once():
    f = Counting(random_table(SMALL, 1))
    result = hill_climb(SMALL, f, budget=100, progress=False)
    assert len(f.calls) == f.distinct() == space_size(SMALL) == 36
    assert (result.best_config, result.best_score) == brute_force_best(SMALL, f.fn)


def test_moves_only_on_strict_improvement():
    # On a constant objective, a climb never moves: after the start and its two
    # neighbours comes a restart anywhere, not the next step along a tie.
    space = {"r": [9, 8, 7, 6, 5, 4, 3, 2, 1]}
    fourth = set()
    for seed in range(12):
        f = Counting(lambda config: 1.0)
        hill_climb(space, f, budget=4, seed=seed, progress=False)
        assert [c["r"] for c in f.calls[:1]] == [5]
        assert {c["r"] for c in f.calls[1:3]} == {6, 4}
        fourth.add(f.calls[3]["r"])
    assert fourth - {7, 3}, "the fourth evaluation always continued along the tie"


def test_neighbour_subsets_when_the_neighbourhood_is_large():
    f = Counting(separable)
    result = hill_climb(SPACE, f, budget=300, neighbours=3, seed=1, progress=False)
    assert result.best_config == OPTIMUM
    start = f.calls[0]
    assert all(l1(SPACE, c, start) == 1 for c in f.calls[1:4])
    # any improvement among the first 3 moves the climb: the next 3 surround the new point
    best_of_first = max(f.calls[1:4], key=separable)
    if separable(best_of_first) > separable(start):
        assert all(l1(SPACE, c, best_of_first) == 1 for c in f.calls[4:7])


def test_maximize_false_finds_the_minimum():
    result = hill_climb(SPACE, lambda c: -separable(c), budget=200, maximize=False,
                        progress=False)
    assert result.best_config == OPTIMUM and result.best_score == 0.0


def test_seeded_runs_are_identical():
    a = hill_climb(SPACE, deceptive, budget=80, seed=3, progress=False)
    b = hill_climb(SPACE, deceptive, budget=80, seed=3, progress=False)
    assert [e.config for e in a.history] == [e.config for e in b.history]


def test_nan_scores_never_win():
    def f(config):
        return float("nan") if config["q"] == 32 else separable_small(config)

    result = hill_climb(SMALL, f, budget=36, progress=False)
    assert not np.isnan(result.best_score)
    assert result.best_config == brute_force_best(
        SMALL, lambda c: -np.inf if c["q"] == 32 else separable_small(c))[0]


def separable_small(config: dict) -> float:
    return -float(sum((i - 1) ** 2 for i in idx(SMALL, config)))


def test_bad_arguments_are_refused():
    with pytest.raises(KeyError, match="missing groups"):
        hill_climb(SMALL, separable_small, start={"q": 32}, progress=False)
    with pytest.raises(ValueError, match="rank 12"):
        hill_climb(SMALL, separable_small, start={"q": 12, "v": 32, "up": 2}, progress=False)
    with pytest.raises(ValueError, match="budget"):
        hill_climb(SMALL, separable_small, budget=0, progress=False)
    with pytest.raises(ValueError, match="neighbours"):
        hill_climb(SMALL, separable_small, neighbours=0, progress=False)


def test_every_history_config_is_in_the_space():
    result = hill_climb(SPACE, plateau, budget=50, progress=False)
    configs = {tuple(c.values()) for c in all_configs(SPACE)}
    assert all(tuple(e.config.values()) in configs for e in result.history)
