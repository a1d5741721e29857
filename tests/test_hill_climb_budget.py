"""hill_climb with an estimate (ordered, first improvement) and a parameter budget (swaps).

Checked against brute force (the best configuration under the budget, every feasible
configuration), and against a reference climb written here from the definition: every move
listed explicitly, sorted by the estimate, the first strict improvement taken.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import transformers as T
from test_search_objectives import SMALL, Counting, idx, random_table
from tiny import VOCAB

from shears.adapters import add_elastic_lora
from shears.search import adapter_parameters, heuristic_config, hill_climb, search_space
from shears.search.space import decode, encode, neighbour_keys

RANKS = (6, 4, 2)  # uniform steps: a unit transfer between equal groups keeps the total


def model_with(targets: list[str], layers: int = 2):
    """A tiny Llama with one adapter group per targeted module (no forward is needed)."""
    config = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    return add_elastic_lora(T.LlamaForCausalLM(config), targets, ranks=RANKS)


@pytest.fixture(scope="module")
def uneven():
    """6 groups of three widths: q (64 + 64), v (64 + 32), up (64 + 128) in two blocks."""
    return model_with(["q_proj", "v_proj", "up_proj"])


@pytest.fixture(scope="module")
def even():
    """6 groups of one width: q and o (64 + 64) in three blocks."""
    return model_with(["q_proj", "o_proj"], layers=3)


def all_keys(space):
    return list(itertools.product(*(range(len(r)) for r in space.values())))


def params_of(model, space, key) -> int:
    return adapter_parameters(model, decode(space, key))


def moves(space, key, fits) -> list[tuple]:
    """Every single move and swap of ``key`` that ``fits``, listed by hand."""
    n = [len(r) for r in space.values()]
    out = []
    for j in range(len(key)):
        for step in (-1, 1):
            if 0 <= key[j] + step < n[j]:
                out.append(key[:j] + (key[j] + step,) + key[j + 1:])
    for up, down in itertools.permutations(range(len(key)), 2):
        if key[up] > 0 and key[down] < n[down] - 1:
            k = list(key)
            k[up] -= 1
            k[down] += 1
            out.append(tuple(k))
    return [k for k in out if fits(k)]


def additive(space, seed: int):
    """A random estimate that is a sum of one value per (group, rank)."""
    rng = np.random.default_rng(seed)
    table = {g: {r: float(rng.normal()) for r in ranks} for g, ranks in space.items()}
    return lambda config: sum(table[g][r] for g, r in config.items())


def reference_climb(space, score, estimate, start, budget, fits, maximize) -> list[tuple]:
    """The keys an ordered first-improvement climb evaluates, up to its first local optimum."""
    sign = -1.0 if maximize else 1.0
    seen: dict[tuple, float] = {}

    def ev(k):
        if k not in seen:
            seen[k] = score(decode(space, k))
        return seen[k]

    def better(a, b):
        return a > b if maximize else a < b

    current = start
    ev(current)
    while len(seen) < budget:
        nearby = moves(space, current, fits)
        known = [k for k in nearby if k in seen]
        best = max(known, key=lambda k: -sign * seen[k], default=None)
        if best is not None and better(seen[best], seen[current]):
            current = best
            continue
        fresh = sorted((k for k in nearby if k not in seen),
                       key=lambda k: sign * estimate(decode(space, k)))
        moved = False
        for k in fresh:
            if len(seen) >= budget:
                break
            if better(ev(k), seen[current]):
                current, moved = k, True
                break
        if not moved:
            break
    return list(seen)


# --- brute force -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_separable_concave_optimum_under_the_budget_found_with_swaps(even, seed):
    # Equal widths, uniform rank steps and a concave gain per group: a configuration no
    # swap or single move improves is the optimum under the budget, so one ordered climb
    # from the heuristic (at the budget's edge: no single move up fits) must reach it.
    space = search_space(even)
    weight = dict(zip(space, np.random.default_rng(seed).uniform(0.2, 2.0, len(space)),
                      strict=True))

    def score(config):  # higher is better
        return float(sum(weight[g] * math.log(r) for g, r in config.items()))

    start = heuristic_config(space)
    budget_params = adapter_parameters(even, start)
    feasible = [k for k in all_keys(space) if params_of(even, space, k) <= budget_params]
    best = max(feasible, key=lambda k: score(decode(space, k)))
    f = Counting(score)
    result = hill_climb(even, f, budget=40, estimate=score, max_params=budget_params,
                        progress=False)
    assert result.best_config == decode(space, best)
    assert len(f.calls) == 40 < len(feasible) / 5  # found well before visiting them all
    assert f.calls.index(decode(space, best)) < 15
    # no single move up fits at the start, so the first move was a swap
    first_move = next(c for c in f.calls[1:] if score(c) > score(start))
    assert sum(c != s for c, s in zip(first_move.values(), start.values(), strict=True)) == 2


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ordered", [False, True])
def test_large_budget_visits_exactly_the_feasible_configurations(uneven, seed, ordered):
    space = search_space(uneven)
    start = {g: space[g][-1] for g in space}  # minimal
    limit = adapter_parameters(uneven, heuristic_config(space))
    feasible = {k for k in all_keys(space) if params_of(uneven, space, k) <= limit}
    f = Counting(random_table(space, seed))
    result = hill_climb(uneven, f, start=start, budget=10_000, seed=seed, max_params=limit,
                        estimate=additive(space, seed) if ordered else None, progress=False)
    visited = [encode(space, e.config) for e in result.history]
    assert len(visited) == len(set(visited)) == len(f.calls)
    assert set(visited) == feasible
    top = max(feasible, key=lambda k: f.fn(decode(space, k)))
    assert result.best_config == decode(space, top)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ordered", [False, True])
def test_budget_respected_at_every_visited_configuration(uneven, seed, ordered):
    space = search_space(uneven)
    rng = np.random.default_rng(seed)
    start = {g: int(rng.choice(r[1:])) for g, r in space.items()}
    limit = adapter_parameters(uneven, start) + int(rng.integers(0, 400))
    result = hill_climb(uneven, random_table(space, seed), start=start, budget=60, seed=seed,
                        maximize=bool(seed % 2), max_params=limit, progress=False,
                        estimate=additive(space, seed) if ordered else None)
    feasible = sum(params_of(uneven, space, k) <= limit for k in all_keys(space))
    assert len(result.history) == min(60, feasible)  # fewer only when all were visited
    for e in result.history:
        assert e.params == adapter_parameters(uneven, e.config) <= limit
    assert result.history[0].config == start


# --- the order of evaluation --------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("maximize", [True, False])
def test_ordered_climb_matches_the_reference_climb(uneven, seed, maximize):
    space = search_space(uneven)
    score, estimate = random_table(space, seed), additive(space, 100 + seed)
    start = heuristic_config(space)
    limit = adapter_parameters(uneven, start) + 96 * (seed % 3)

    def fits(k):
        return params_of(uneven, space, k) <= limit

    ref = reference_climb(space, score, estimate, encode(space, start), 200, fits, maximize)
    f = Counting(score)
    hill_climb(uneven, f, budget=len(ref), maximize=maximize, estimate=estimate,
               max_params=limit, progress=False)
    assert [encode(space, c) for c in f.calls] == ref
    assert len(ref) > 10  # the climb moved and tried several neighbours


@pytest.mark.parametrize("seed", range(4))
def test_ordered_climb_without_budget_matches_the_reference(seed):
    # no budget: the moves are the single moves only, and a bare space will do
    score, estimate = random_table(SMALL, seed), additive(SMALL, seed + 7)
    ref = _reference_singles(SMALL, score, estimate, encode(SMALL, heuristic_config(SMALL)))
    f = Counting(score)
    hill_climb(SMALL, f, budget=len(ref), estimate=estimate, progress=False)
    assert [encode(SMALL, c) for c in f.calls] == ref


def _reference_singles(space, score, estimate, start) -> list[tuple]:
    seen = {start: score(decode(space, start))}
    current = start
    while True:
        known = [k for k in neighbour_keys(space, current) if k in seen]
        best = max(known, key=lambda k: seen[k], default=None)
        if best is not None and seen[best] > seen[current]:
            current = best
            continue
        fresh = sorted((k for k in neighbour_keys(space, current) if k not in seen),
                       key=lambda k: -estimate(decode(space, k)))
        for k in fresh:
            seen[k] = score(decode(space, k))
            if seen[k] > seen[current]:
                current = k
                break
        else:
            return list(seen)


def test_first_improvement_moves_at_once():
    # The estimate ranks q's two neighbours first, the worse one first: the climb evaluates
    # the worse one, then the better one, and moves there without trying the other four.
    start = {"q": 24, "v": 24, "up": 8}

    def score(c):
        return {32: 1.0, 24: 0.0, 16: -1.0}[c["q"]]

    def estimate(c):
        return 10.0 if c["q"] == 16 else 9.0 if c["q"] == 32 else 0.0

    f = Counting(score)
    hill_climb(SMALL, f, start=start, budget=3, estimate=estimate, progress=False)
    assert [c["q"] for c in f.calls] == [24, 16, 32]
    f = Counting(score)
    hill_climb(SMALL, f, start=start, budget=5, estimate=estimate, progress=False)
    # after the move to q=32 (key (0, 1, 1)) its own neighbours come next, tied in the
    # estimate, so in the canonical order; q=24 is known and not evaluated again
    assert [idx(SMALL, c) for c in f.calls[3:]] == [(0, 0, 1), (0, 2, 1)]


def test_ties_in_the_estimate_keep_the_canonical_order_and_singles_come_first(uneven):
    space = search_space(uneven)
    start = heuristic_config(space)  # every group in the middle: 12 singles, 30 swaps
    key = encode(space, start)
    f = Counting(lambda c: 0.0)  # a plateau: nothing improves
    hill_climb(uneven, f, start=start, budget=43, estimate=lambda c: 1.0,
               max_params=adapter_parameters(uneven, {g: r[0] for g, r in space.items()}),
               progress=False)
    order = [encode(space, c) for c in f.calls[1:]]
    assert order[:12] == neighbour_keys(space, key)
    swaps = [(u, d) for u, d in itertools.product(range(6), range(6)) if u != d]
    expected = []
    for u, d in swaps:
        k = list(key)
        k[u] -= 1
        k[d] += 1
        expected.append(tuple(k))
    assert order[12:] == expected


def test_ties_in_the_score_never_move():
    # On a constant objective the climb tries both neighbours (highest estimate first:
    # r=4, then r=6) and then restarts anywhere, not along the tie.
    space = {"r": [9, 8, 7, 6, 5, 4, 3, 2, 1]}
    fourth = set()
    for seed in range(12):
        f = Counting(lambda config: 1.0)
        hill_climb(space, f, budget=4, seed=seed, estimate=lambda c: -c["r"], progress=False)
        assert [c["r"] for c in f.calls[:3]] == [5, 4, 6]
        fourth.add(f.calls[3]["r"])
    assert fourth - {7, 3}, "the fourth evaluation always continued along the tie"


def test_neighbours_caps_the_tries_of_an_ordered_climb():
    # Maximised estimate c["q"]: q=32 first, then the moves of v and up (estimate 24, in
    # the canonical order: v=32 first). With neighbours=1 the climb gives up after q=32.
    start = heuristic_config(SMALL)
    thirds = set()
    for seed in range(8):
        uncapped, capped = Counting(lambda c: 1.0), Counting(lambda c: 1.0)
        hill_climb(SMALL, uncapped, budget=3, estimate=lambda c: c["q"], seed=seed,
                   progress=False)
        hill_climb(SMALL, capped, budget=3, neighbours=1, estimate=lambda c: c["q"],
                   seed=seed, progress=False)
        assert uncapped.calls == [start, {**start, "q": 32}, {**start, "v": 32}]
        assert capped.calls[:2] == uncapped.calls[:2]
        thirds.add(tuple(capped.calls[2].values()))
    assert thirds - {tuple({**start, "v": 32}.values())}, "the cap never restarted the climb"


# --- without an estimate, with a budget ------------------------------------------------------

def test_unordered_budget_climb_evaluates_the_whole_neighbourhood_first(uneven):
    space = search_space(uneven)
    start = heuristic_config(space)
    limit = adapter_parameters(uneven, start)

    def fits(k):
        return params_of(uneven, space, k) <= limit

    expected = set(moves(space, encode(space, start), fits))
    f = Counting(lambda c: 0.0)
    hill_climb(uneven, f, budget=1 + len(expected), max_params=limit, progress=False)
    assert {encode(space, c) for c in f.calls[1:]} == expected
    # the single moves up do not fit, swaps do
    assert any(sum(a != b for a, b in zip(k, encode(space, start), strict=True)) == 2
               for k in expected)


def test_seeded_and_deterministic(uneven):
    space = search_space(uneven)
    limit = adapter_parameters(uneven, heuristic_config(space))
    runs = {}
    for seed in (0, 0, 1):
        for ordered in (False, True):
            r = hill_climb(uneven, random_table(space, 3), budget=80, seed=seed,
                           max_params=limit, estimate=additive(space, 1) if ordered else None,
                           neighbours=4, progress=False)
            runs.setdefault((seed, ordered), []).append([e.config for e in r.history])
    assert runs[(0, False)][0] == runs[(0, False)][1]
    assert runs[(0, True)][0] == runs[(0, True)][1]
    assert runs[(0, False)][0] != runs[(1, False)][0]


# --- large neighbourhoods stay cheap -------------------------------------------------------

def test_ninety_groups_order_swaps_without_listing_them():
    model = model_with(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"], layers=13)
    space = search_space(model)
    assert len(space) == 91
    est_table = additive(space, 5)
    calls = Counting(est_table)
    start = heuristic_config(space)
    limit = adapter_parameters(model, start)

    def fits(k):
        return params_of(model, space, k) <= limit

    nearby = moves(space, encode(space, start), fits)
    assert len(nearby) > 5000
    best = min(nearby, key=lambda k: est_table(decode(space, k)))
    # minimised score, predicted exactly: the first neighbour tried is the lowest estimate
    hill_climb(model, est_table, budget=2, estimate=calls, max_params=limit, maximize=False,
               progress=False)
    tried = [encode(space, c) for c in calls.calls]
    f = Counting(est_table)
    hill_climb(model, f, budget=2, estimate=est_table, max_params=limit, maximize=False,
               progress=False)
    assert encode(space, f.calls[1]) == best
    assert len(set(tried)) == len(tried)
    assert len(calls.calls) <= 2 * len(space) + 1  # O(groups) estimates, not O(groups^2)


# --- refusals ----------------------------------------------------------------------------

def test_budget_refusals(uneven):
    space = search_space(uneven)
    start = heuristic_config(space)
    f = Counting(lambda c: 0.0)
    minimal = 2 * 2 * ((64 + 64) + (64 + 32) + (64 + 128))  # rank 2, two blocks of q, v, up
    with pytest.raises(ValueError, match=rf"over max_params=10.*minimal sub-adapter has {minimal}"):
        hill_climb(uneven, f, start=start, max_params=10, progress=False)
    with pytest.raises(ValueError, match="max_params needs a model"):
        hill_climb(space, f, max_params=10_000, progress=False)
    with pytest.raises(TypeError, match="max_params must be an int"):
        hill_climb(uneven, f, max_params=1e4, progress=False)
    assert f.calls == []
