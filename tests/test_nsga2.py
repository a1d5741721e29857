"""NSGA-II / R-NSGA-II: the sorting primitives by hand, and searches on known fronts."""

from __future__ import annotations

import numpy as np
import pytest
from test_search_objectives import SMALL, SPACE, TARGET, Counting, all_configs, idx, separable

from shears.search import nsga2_search
from shears.search.pareto import (
    crowding_distance,
    non_dominated_sort,
    pareto_mask,
    preference_distance,
)
from shears.search.space import decode

# A second bowl: cost is the squared index distance to CHEAP, score the one to TARGET, so
# the front runs from CHEAP (cost 0) to TARGET (best score) and both extremes are unique.
CHEAP = (2, 0, 2, 1, 1, 2, 4, 0)


def cost(config: dict) -> float:
    return float(sum((a - b) ** 2 for a, b in zip(idx(SPACE, config), CHEAP, strict=True)))


def dominates(a, b) -> bool:
    """Score maximised, cost minimised; written out independently of shears."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


# --- primitives ------------------------------------------------------------------------

def test_non_dominated_sort_by_hand():
    F = np.array([[1, 5], [2, 3], [3, 4], [4, 1], [2, 3], [5, 5]], dtype=float)
    fronts = [sorted(f.tolist()) for f in non_dominated_sort(F)]
    assert fronts == [[0, 1, 3, 4], [2], [5]]  # the duplicate (2, 3) stays in front 0
    assert pareto_mask(F).tolist() == [True, True, False, True, True, False]


def test_crowding_distance_by_hand():
    F = np.array([[0, 6], [1, 2], [3, 1], [4, 0]], dtype=float)
    # objective 0 (span 4): row 1 (3-0)/4, row 2 (4-1)/4; objective 1 (span 6): row 1
    # (6-1)/6, row 2 (2-0)/6; rows 0 and 3 are extremes.
    expected = [np.inf, 0.75 + 5 / 6, 0.75 + 2 / 6, np.inf]
    np.testing.assert_allclose(crowding_distance(F), expected)
    assert np.isinf(crowding_distance(F[:2])).all()


def test_preference_distance_by_hand():
    F = np.array([[0, 6], [1, 2], [3, 1], [4, 0]], dtype=float)
    lo, hi, rng = np.array([0.0, 0.0]), np.array([4.0, 6.0]), np.random.default_rng(0)
    # normalised rows (0, 1) (.25, .33) (.75, .17) (1, 0); reference (1, 1) -> (.25, .17):
    # distances .87 .17 .5 .77 -> ranks 3 0 1 2
    pref = preference_distance(F, np.array([[1.0, 1.0]]), lo, hi, 0.001, rng)
    assert pref.tolist() == [3, 0, 1, 2]
    # a second reference point on row 3 gives it rank 0; each row keeps its best rank
    pref = preference_distance(F, np.array([[1.0, 1.0], [4.0, 0.0]]), lo, hi, 0.001, rng)
    assert pref.tolist() == [3, 0, 1, 0]


@pytest.mark.parametrize("seed", range(4))
def test_epsilon_clearing_pushes_back_all_but_one_of_near_duplicates(seed):
    F = np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 1.0], [1.0005, 2.0]])
    pref = preference_distance(F, np.array([[1.0, 2.0]]), F.min(0), F.max(0), 0.001,
                               np.random.default_rng(seed))
    n = len(F)
    assert sum(pref[[0, 1, 3]] >= n) == 2  # two of the three near-duplicates are cleared
    assert pref[2] < n


def test_primitives_agree_with_pymoo():
    pytest.importorskip("pymoo")
    from pymoo.operators.survival.rank_and_crowding.metrics import calc_crowding_distance
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    rng = np.random.default_rng(0)
    for _ in range(20):
        F = rng.integers(0, 6, size=(40, 2)).astype(float)  # many ties and duplicates
        ours = [sorted(f.tolist()) for f in non_dominated_sort(F)]
        assert ours == [sorted(f.tolist()) for f in NonDominatedSorting().do(F)]
        G = rng.random((12, 3))
        # pymoo averages over the objectives where Deb et al. sum: same order, factor m
        np.testing.assert_allclose(crowding_distance(G),
                                   3 * calc_crowding_distance(G, filter_out_duplicates=False))


# --- searches --------------------------------------------------------------------------

def true_front(space, score, cost_fn) -> set[tuple[float, float]]:
    """Brute force with a sweep: by cost, a point is on the front when it beats every
    cheaper point's score."""
    points = sorted({(score(c), cost_fn(c)) for c in all_configs(space)},
                    key=lambda p: (p[1], -p[0]))
    front, best = set(), -np.inf
    for s, c in points:
        if s > best:
            front.add((s, c))
            best = s
    return front


@pytest.mark.parametrize("seed", range(5))
def test_front_is_non_dominated_and_holds_the_known_extremes(seed):
    f = Counting(separable)
    result = nsga2_search(SPACE, f, cost=cost, population=16, generations=45, seed=seed,
                          progress=False)
    assert len(f.calls) == f.distinct() == len(result.history) == 16 * 46
    front = [(e.score, e.cost) for e in result.pareto_front]
    assert not any(dominates(a, b) for a in front for b in front)
    # every evaluation outside the front is dominated by a member of it
    for e in result.history:
        if (e.score, e.cost) not in front:
            assert any(dominates(p, (e.score, e.cost)) for p in front)
    configs = [e.config for e in result.pareto_front]
    assert decode(SPACE, TARGET) in configs and decode(SPACE, CHEAP) in configs
    assert set(front) <= true_front(SPACE, separable, cost)


def test_small_space_is_exhausted_once_and_the_front_is_exact():
    def score(c):
        return -float((c["q"] - 20) ** 2 + (c["v"] - 28) ** 2 + 3 * abs(c["up"] - 5))

    def size(c):
        return float(c["q"] + c["v"] + 2 * c["up"])

    f = Counting(score)
    result = nsga2_search(SMALL, f, cost=size, population=8, generations=20, progress=False)
    assert len(f.calls) == f.distinct() == 36
    assert {(e.score, e.cost) for e in result.pareto_front} == true_front(SMALL, score, size)


@pytest.mark.parametrize("budget", [3, 8, 21])
def test_budget_respected_exactly(budget):
    f = Counting(separable)
    result = nsga2_search(SPACE, f, cost=cost, population=8, generations=10, budget=budget,
                          progress=False)
    assert len(f.calls) == f.distinct() == len(result.history) == budget


def test_first_generation_holds_the_reference_sub_adapters():
    f = Counting(separable)
    nsga2_search(SPACE, f, cost=cost, population=4, generations=0, progress=False)
    heuristic = {g: r[(len(r) - 1) // 2] for g, r in SPACE.items()}
    assert f.calls[:3] == [heuristic, {g: r[0] for g, r in SPACE.items()},
                           {g: r[-1] for g, r in SPACE.items()}]


def test_minimising_the_score():
    result = nsga2_search(SPACE, lambda c: -separable(c), cost=cost, population=16,
                          generations=45, maximize=False, progress=False)
    assert decode(SPACE, TARGET) in [e.config for e in result.pareto_front]
    assert result.best_config == decode(SPACE, TARGET)


# Distinct weights make the front fine-grained (41 points), so a population of 12 cannot
# hold all of it and the reference point has something to choose.
WA = np.array([1.0, 1.3, 1.7, 2.2, 2.9, 3.7, 0.45, 4.1])
WB = np.array([3.1, 0.7, 1.9, 2.6, 1.1, 4.3, 0.55, 1.5])


def weighted_score(c):
    return -float(WA @ (np.array(idx(SPACE, c)) - TARGET) ** 2)


def weighted_cost(c):
    return float(WB @ (np.array(idx(SPACE, c)) - CHEAP) ** 2)


@pytest.mark.parametrize("reference", [(-3.0, 30.0), (-30.0, 3.0)])
def test_reference_points_steer_the_search(reference):
    # The late evaluations of R-NSGA-II lie nearer the reference point than NSGA-II's.
    def median_distance(result):
        late = np.array([[e.score, e.cost] for e in result.history[-60:]])
        return np.median(np.linalg.norm((late - reference) / [43.15, 54.0], axis=1))

    for seed in range(4):
        kw = dict(cost=weighted_cost, population=12, generations=25, seed=seed, progress=False)
        plain = nsga2_search(SPACE, weighted_score, **kw)
        steered = nsga2_search(SPACE, weighted_score, reference_points=[reference], **kw)
        assert steered.method == "rnsga2" and plain.method == "nsga2"
        assert median_distance(steered) < median_distance(plain)


def test_default_cost_is_adapter_parameters_of_the_model():
    from tiny import make_tiny

    from shears.adapters import adapter_parameters, add_elastic_lora, get_config

    model = add_elastic_lora(make_tiny("llama"), ["q_proj", "v_proj"], ranks=(8, 4, 2))
    before = get_config(model)
    result = nsga2_search(model, lambda c: -float(sum(c.values())), population=6,
                          generations=2, progress=False)
    for e in result.history:
        assert e.cost == e.params == adapter_parameters(model, e.config)
    assert get_config(model) == before
    front = result.pareto_front  # score = -total rank, cost grows with rank: one winner
    assert [e.config for e in front] == [{g: 2 for g in before}]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="needs `cost`"):
        nsga2_search(SMALL, separable, progress=False)
    with pytest.raises(ValueError, match="pairs"):
        nsga2_search(SMALL, separable, cost=sum, reference_points=[(1, 2, 3)], progress=False)
    with pytest.raises(ValueError, match="population"):
        nsga2_search(SMALL, separable, cost=sum, population=1, progress=False)
