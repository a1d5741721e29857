"""NSGA-II (and R-NSGA-II) over sub-adapters: score up, cost (adapter parameters) down.

Individuals are rank-index vectors (see :mod:`shears.search.space`). Each generation
breeds ``population`` new, never-evaluated children by binary tournament, uniform
crossover and one-step mutation, then keeps the best ``population`` of parents and
children by non-dominated rank and crowding distance (Deb et al. 2002). With reference
points, the preference distance and epsilon clearing of R-NSGA-II (Deb & Sundar 2006)
replace the crowding distance, steering the front towards the trade-offs asked for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from shears.adapters import adapter_parameters, heuristic_config, maximal_config, minimal_config

from .evaluator import Budget, Cost, Evaluate, Resume, load_prior
from .pareto import crowding_distance, non_dominated_sort, preference_distance
from .result import SearchResult, SearchSpace
from .space import Key, encode, random_unvisited, resolve, sizes

_CROSSOVER_RATE = 0.9
_TRIES_PER_CHILD = 20  # before falling back to a random unvisited configuration


def nsga2_search(
    space_or_model: nn.Module | Mapping[str, list[int]],
    evaluate: Evaluate,
    cost: Cost | None = None,
    population: int = 16,
    generations: int = 10,
    seed: int = 0,
    reference_points: Sequence[Sequence[float]] | None = None,
    epsilon: float = 0.001,
    maximize: bool = True,
    budget: int | None = None,
    progress: bool = True,
    resume: Resume = None,
    checkpoint: str | os.PathLike | None = None,
) -> SearchResult:
    """Two-objective evolutionary search: ``evaluate`` (maximised) against ``cost`` (minimised).

    Args:
        space_or_model: a model carrying elastic adapters or a search space dict.
        evaluate: ``evaluate(config) -> float``, e.g. from :func:`make_evaluator`.
        cost: ``cost(config) -> float``, assumed cheap. Default: the adapter parameters of
            the sub-adapter, which needs a model; with a bare search space pass ``cost``
            (for instance ``lambda c: sum(c.values())``, the total rank).
        population: individuals per generation; the first generation holds the heuristic,
            maximal and minimal sub-adapters and random ones.
        generations: generations bred after the first.
        seed: seeds initialisation, selection, crossover, mutation and clearing.
        reference_points: ``[(score, cost), ...]`` trade-offs to aim for (R-NSGA-II).
        epsilon: R-NSGA-II clearing radius, in summed normalised objective differences.
        maximize: whether a larger score is better (cost is always minimised).
        budget: most evaluations; default ``population * (generations + 1)``.
        progress: show a tqdm bar.
        resume: a saved result (or its JSON path) whose evaluations are reused for free;
            with the same arguments the search retraces it and continues.
        checkpoint: a JSON path where the search so far is saved (atomically) after every
            evaluation; pass it as ``resume`` too to continue a killed run (a missing file
            is then a fresh start).

    Returns:
        A :class:`SearchResult` of every evaluation; ``pareto_front`` holds the trade-offs.
    """
    if population < 2:
        raise ValueError(f"population must be at least 2, got {population}")
    space, model = resolve(space_or_model)
    cost = _default_cost(cost, model)
    refs = None if reference_points is None else _to_minimised(reference_points, maximize)
    rng = np.random.default_rng(seed)
    budget = population * (generations + 1) if budget is None else budget
    settings = {"population": population, "generations": generations, "seed": seed,
                "budget": budget, "epsilon": epsilon,
                "reference_points": None if reference_points is None
                else [list(map(float, p)) for p in reference_points]}
    judge = Budget(space, evaluate, budget, model=model, cost=cost,
                   prior=load_prior(resume, checkpoint), maximize=maximize, progress=progress,
                   desc="nsga2", checkpoint=checkpoint,
                   method="nsga2" if refs is None else "rnsga2", settings=settings)

    keys = _initial(space, judge, population, rng)
    for _ in range(generations):
        if judge.exhausted:
            break
        rank, secondary = _fitness(_objectives(judge, keys), refs, epsilon, rng)
        children = _breed(space, judge, keys, rank, secondary, population, rng)
        if not children:
            break  # every configuration has been evaluated
        merged = keys + [k for k in children if _evaluated(judge, k)]
        keys = _survivors(_objectives(judge, merged), merged, population, refs, epsilon, rng)
    return judge.result()


def _default_cost(cost: Cost | None, model: nn.Module | None) -> Cost:
    if cost is not None:
        return cost
    if model is None:
        raise ValueError("nsga2_search needs `cost` when given a search space instead of a "
                         "model (the default cost, adapter_parameters, reads the model)")
    return lambda config: float(adapter_parameters(model, config))


def _to_minimised(points: Sequence[Sequence[float]], maximize: bool) -> np.ndarray:
    """Reference points as (score, cost) pairs, turned into the minimised objective space."""
    P = np.atleast_2d(np.asarray(points, dtype=float))
    if P.shape[1] != 2:
        raise ValueError(f"reference points are (score, cost) pairs, got shape {P.shape}")
    return P * np.array([-1.0 if maximize else 1.0, 1.0])


def _evaluated(judge: Budget, key: Key) -> bool:
    """Evaluate ``key`` if the budget allows; whether it now has a value."""
    if key in judge.visited:
        return True
    if judge.exhausted:
        return False
    judge(key)
    return True


def _objectives(judge: Budget, keys: list[Key]) -> np.ndarray:
    """(n, 2) minimised objectives: -score (or score) and cost; NaN scores rank last."""
    sign = -1.0 if judge.maximize else 1.0
    F = np.array([[sign * judge(k).score, judge(k).cost] for k in keys], dtype=float)
    return np.nan_to_num(F, nan=np.inf)


def _initial(space: SearchSpace, judge: Budget, population: int,
             rng: np.random.Generator) -> list[Key]:
    """The paper's three reference sub-adapters, then random unvisited ones."""
    seeds = [encode(space, f(space)) for f in (heuristic_config, maximal_config, minimal_config)]
    keys = list(dict.fromkeys(seeds))[:population]
    while len(keys) < population:
        key = random_unvisited(space, set(judge.visited) | set(keys), rng)
        if key is None:
            break
        keys.append(key)
    return [k for k in keys if _evaluated(judge, k)]


def _fitness(F: np.ndarray, refs: np.ndarray | None, epsilon: float,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per row: its front index, and a secondary key where smaller is better (negated
    crowding distance, or the R-NSGA-II preference distance)."""
    rank = np.empty(len(F), dtype=np.int64)
    secondary = np.empty(len(F))
    lower, upper = _finite_extent(F)
    for i, front in enumerate(non_dominated_sort(F)):
        rank[front] = i
        if refs is None:
            secondary[front] = -crowding_distance(F[front])
        else:
            secondary[front] = preference_distance(F[front], refs, lower, upper, epsilon, rng)
    return rank, secondary


def _finite_extent(F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-objective min and max over the finite values (normalisation for R-NSGA-II)."""
    masked = np.where(np.isfinite(F), F, np.nan)
    lower, upper = np.nanmin(masked, axis=0), np.nanmax(masked, axis=0)
    return np.nan_to_num(lower), np.nan_to_num(upper)


def _survivors(F: np.ndarray, keys: list[Key], population: int, refs: np.ndarray | None,
               epsilon: float, rng: np.random.Generator) -> list[Key]:
    """The ``population`` best keys: whole fronts first, the last one cut by ``secondary``."""
    rank, secondary = _fitness(F, refs, epsilon, rng)
    order = np.lexsort((secondary, rank))  # by rank, then by secondary
    return [keys[i] for i in order[:population]]


def _breed(space: SearchSpace, judge: Budget, keys: list[Key], rank: np.ndarray,
           secondary: np.ndarray, population: int, rng: np.random.Generator) -> list[Key]:
    """Up to ``population`` distinct children never visited before."""
    n = sizes(space)
    parents = np.array(keys)
    children: list[Key] = []
    taken = set(judge.visited)
    for _ in range(population):
        child = None
        for _ in range(_TRIES_PER_CHILD):
            a, b = _tournament(rank, secondary, rng), _tournament(rank, secondary, rng)
            candidate = _mutate(_crossover(parents[a], parents[b], rng), n, rng)
            if candidate not in taken:
                child = candidate
                break
        if child is None:
            child = random_unvisited(space, taken, rng)
        if child is None:
            break  # the whole space has been visited
        children.append(child)
        taken.add(child)
    return children


def _tournament(rank: np.ndarray, secondary: np.ndarray, rng: np.random.Generator) -> int:
    """Binary tournament: lower front wins, then the smaller secondary key."""
    i, j = rng.integers(len(rank), size=2)
    return int(i) if (rank[i], secondary[i]) <= (rank[j], secondary[j]) else int(j)


def _crossover(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uniform crossover: each group's rank index from either parent."""
    if rng.random() >= _CROSSOVER_RATE:
        return a.copy()
    return np.where(rng.random(len(a)) < 0.5, a, b)


def _mutate(x: np.ndarray, n: np.ndarray, rng: np.random.Generator) -> Key:
    """Each group, with probability 1 / groups, moves one step along its rank list."""
    x = x.copy()
    for j in np.flatnonzero(rng.random(len(x)) < 1.0 / len(x)):
        if n[j] > 1:
            step = rng.choice((-1, 1))
            x[j] = x[j] + step if 0 <= x[j] + step < n[j] else x[j] - step
    return tuple(int(v) for v in x)
