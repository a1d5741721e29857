"""Synthetic search objectives with known optima, shared by the search tests.

Each objective is a function of the rank *indices* (0 = r_max) so that its optimum is
easy to state; the tests in this file check those statements by brute force, so the
search tests can rely on them.
"""

from __future__ import annotations

import itertools

import numpy as np

# Six groups of the paper's rank list and two of other lengths: 3**6 * 5 * 2 = 7290 configs.
SPACE = {f"layer{i}": [32, 24, 16] for i in range(6)} | {"up": [64, 48, 32, 16, 8], "down": [8, 4]}
SMALL = {"q": [32, 24, 16], "v": [32, 24, 16], "up": [16, 8, 4, 2]}  # 36 configs

TARGET = (0, 2, 1, 0, 2, 1, 3, 1)   # the global optimum of every objective below
DECOY = (1, 1, 1, 1, 1, 2, 2, 0)    # a local optimum next to the heuristic (1, ..., 1, 2, 0)


def idx(space: dict, config: dict) -> tuple[int, ...]:
    return tuple(space[g].index(config[g]) for g in space)


def all_configs(space: dict) -> list[dict]:
    groups = list(space)
    return [dict(zip(groups, ranks, strict=True)) for ranks in itertools.product(*space.values())]


def separable(config: dict) -> float:
    """Unimodal: minus the squared index distance to TARGET."""
    return -float(sum((a - b) ** 2 for a, b in zip(idx(SPACE, config), TARGET, strict=True)))


def deceptive(config: dict) -> float:
    """Non-separable, two peaks: the global one at TARGET (10) and a decoy at DECOY (8)
    whose basin holds the heuristic start."""
    x = idx(SPACE, config)
    d_target = sum(abs(a - b) for a, b in zip(x, TARGET, strict=True))
    d_decoy = sum(abs(a - b) for a, b in zip(x, DECOY, strict=True))
    return float(max(10 - d_target, 8 - 2 * d_decoy))


def plateau(config: dict) -> float:
    """Flat (0) everywhere except a pyramid of radius 4 around TARGET."""
    d = sum(abs(a - b) for a, b in zip(idx(SPACE, config), TARGET, strict=True))
    return float(max(0, 4 - d))


def random_table(space: dict, seed: int):
    """An objective without structure: an independent random score per configuration."""
    rng = np.random.default_rng(seed)
    table = {idx(space, c): float(rng.normal()) for c in all_configs(space)}
    return lambda config: table[idx(space, config)]


class Counting:
    """Wraps an objective and records every configuration it is asked to score."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, config: dict) -> float:
        self.calls.append(dict(config))
        return self.fn(config)

    def distinct(self) -> int:
        return len({tuple(sorted(c.items())) for c in self.calls})


def brute_force_best(space: dict, fn) -> tuple[dict, float]:
    configs = all_configs(space)
    scores = [fn(c) for c in configs]
    i = int(np.argmax(scores))
    return configs[i], scores[i]


# --- the claims above, checked ---------------------------------------------------------

def test_target_is_the_unique_optimum_of_each_objective():
    target = {g: SPACE[g][i] for g, i in zip(SPACE, TARGET, strict=True)}
    for fn in (separable, deceptive, plateau):
        scores = {tuple(c.values()): fn(c) for c in all_configs(SPACE)}
        best = max(scores.values())
        assert fn(target) == best
        assert sum(s == best for s in scores.values()) == 1


def test_decoy_is_a_strict_local_optimum_of_deceptive_and_holds_the_heuristic():
    from shears.search.space import decode, neighbour_keys

    decoy = decode(SPACE, DECOY)
    assert deceptive(decoy) == 8 < 10
    assert all(deceptive(decode(SPACE, k)) < 8 for k in neighbour_keys(SPACE, DECOY))
    heuristic = tuple((len(r) - 1) // 2 for r in SPACE.values())
    assert sum(abs(a - b) for a, b in zip(heuristic, DECOY, strict=True)) == 1
    assert deceptive(decode(SPACE, heuristic)) == 6  # in the decoy's basin


def test_plateau_is_flat_almost_everywhere():
    flat = sum(plateau(c) == 0 for c in all_configs(SPACE))
    assert flat / len(all_configs(SPACE)) > 0.9
