"""Budgeted hill-climbing over sub-adapters, the search the Shears paper reports best.

From the heuristic sub-adapter, look at the neighbours (one group one step up or down its
rank list) and move only to a strictly better one. On a local optimum or plateau, restart
from a random configuration not yet visited. Every configuration is evaluated at most
once, and the best ever seen is returned, which is what the authors' notebook did not do
(it always moved, and kept the last configuration).

Two ways to pick the move. Without an estimate: evaluate the neighbours in a seeded random
order (in subsets of ``neighbours``) and move to the best. With ``estimate`` (a cheap
prediction of the score, e.g. from ``rank_sensitivity``): try them most promising first
and move to the first strict improvement, which is what makes a climb of a few dozen
evaluations move at all. With ``max_params`` every configuration visited stays within an
adapter-parameter budget, and swaps (one group up, another down) let the climb move along
the budget's edge (see :mod:`shears.search.moves`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping

import numpy as np
from torch import nn

from shears.adapters import adapter_parameters, heuristic_config

from .evaluator import Budget, Evaluate, Resume, load_prior
from .moves import Neighbourhood, ParamTable, known_moves, restart
from .result import Config, SearchResult
from .space import Key, decode, encode, resolve


def hill_climb(
    space_or_model: nn.Module | Mapping[str, list[int]],
    evaluate: Evaluate,
    start: Mapping[str, int] | None = None,
    budget: int = 50,
    seed: int = 0,
    maximize: bool = True,
    neighbours: int | None = None,
    progress: bool = True,
    resume: Resume = None,
    estimate: Callable[[Config], float] | None = None,
    max_params: int | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> SearchResult:
    """Hill-climb with random restarts for the best sub-adapter, within ``budget`` evaluations.

    Args:
        space_or_model: a model carrying elastic adapters (the history then records the
            adapter parameters of each sub-adapter) or a search space dict.
        evaluate: ``evaluate(config) -> float``, e.g. from :func:`make_evaluator`.
        start: first configuration; the heuristic sub-adapter by default.
        budget: most distinct configurations evaluated, resumed ones included. Fewer are
            spent only when the whole space (within ``max_params``) has been visited.
        seed: seeds the neighbour order (without ``estimate``) and the restarts.
        maximize: whether a larger score is better.
        neighbours: without ``estimate``: when a configuration has more unvisited
            neighbours than this, evaluate a random subset of this size at a time (the next
            subset only if none of them improves). With ``estimate``: the most unvisited
            neighbours tried from one configuration before it counts as a local optimum.
            ``None``: all of them.
        progress: show a tqdm bar.
        resume: a saved result (or its JSON path). With the same arguments the search
            retraces it without re-evaluating anything and continues where it stopped.
        estimate: ``estimate(config) -> float``, a cheap prediction of ``evaluate`` (same
            direction: lower is better when ``maximize=False``). Neighbours are then tried
            in its order, most promising first, and the climb moves to the first one that
            is strictly better. Swaps are ordered as if it were additive over groups.
        max_params: every configuration visited (the start included) has at most this
            many adapter parameters; needs a model. Adds swap moves to the neighbourhood.
        checkpoint: a JSON path where the search so far is saved (atomically) after every
            evaluation; pass it as ``resume`` too to continue a killed run (a missing file
            is then a fresh start).

    Returns:
        A :class:`SearchResult` whose ``best_config`` is the best configuration ever seen.
    """
    if neighbours is not None and neighbours < 1:
        raise ValueError(f"neighbours must be at least 1, got {neighbours}")
    space, model = resolve(space_or_model)
    key: Key | None = encode(space, heuristic_config(space) if start is None else start)
    table = _param_table(model, space, key, max_params)
    settings = {"budget": budget, "seed": seed, "neighbours": neighbours,
                "start": None if start is None else dict(start), "max_params": max_params,
                "estimate": estimate is not None}
    rng = np.random.default_rng(seed)
    judge = Budget(space, evaluate, budget, model=model,
                   prior=load_prior(resume, checkpoint), maximize=maximize, progress=progress,
                   desc="hill-climb", checkpoint=checkpoint, method="hill_climb",
                   settings=settings)
    while key is not None and not judge.exhausted:
        if estimate is None:
            _climb(space, judge, key, rng, neighbours, table, max_params)
        else:
            _climb_ordered(space, judge, key, estimate, neighbours, table, max_params)
        key = restart(space, set(judge.visited), rng, table, max_params)
    return judge.result()


def _param_table(model: nn.Module | None, space, start: Key,
                 max_params: int | None) -> ParamTable | None:
    """The parameter table a budget needs, after checking the budget and the start."""
    if max_params is None:
        return None
    if isinstance(max_params, bool) or not isinstance(max_params, (int, np.integer)):
        raise TypeError(f"max_params must be an int, got {max_params!r}")
    if model is None:
        raise ValueError("max_params needs a model (adapter parameters are read from it); "
                         "a bare search space has none")
    table = ParamTable(model, space)
    params = adapter_parameters(model, decode(space, start))
    if params > max_params:
        raise ValueError(f"the start has {params} adapter parameters, over max_params="
                         f"{max_params}; pass a start within the budget (the minimal "
                         f"sub-adapter has {table(tuple(len(r) - 1 for r in space.values()))})")
    return table


def _climb(space, judge: Budget, key: Key, rng: np.random.Generator, limit: int | None,
           table: ParamTable | None, max_params: int | None) -> None:
    """Climb from ``key`` to the best of each subset of neighbours, while strictly better."""
    current = judge(key)
    while True:
        nearby = Neighbourhood(space, key, table, max_params)
        # Neighbours already visited are known for free and may still be the better move.
        best_key = _best_known(judge, known_moves(nearby, judge.visited))
        fresh = (k for k in nearby.random_order(rng) if k not in judge.visited)
        step = limit
        while not _improves(judge, best_key, current.score) and not judge.exhausted:
            room = judge.budget - judge.spent
            batch = _take(fresh, room if step is None else min(step, room))
            if not batch:
                break
            best_key = _best_known(judge, batch if best_key is None else [best_key, *batch])
        if not _improves(judge, best_key, current.score):
            return  # a local optimum (or plateau), or no budget left to find out
        key, current = best_key, judge(best_key)


def _climb_ordered(space, judge: Budget, key: Key, estimate: Callable[[Config], float],
                   limit: int | None, table: ParamTable | None, max_params: int | None) -> None:
    """Climb from ``key``: neighbours most promising first, move to the first strict gain."""
    current = judge(key)
    while not judge.exhausted:
        nearby = Neighbourhood(space, key, table, max_params)
        best_key = _best_known(judge, known_moves(nearby, judge.visited))
        if not _improves(judge, best_key, current.score):
            best_key = _first_improvement(judge, nearby.estimated_order(estimate, judge.maximize),
                                          current.score, limit)
        if best_key is None:
            return  # a local optimum (or plateau), or no budget left to find out
        key, current = best_key, judge(best_key)


def _first_improvement(judge: Budget, order: Iterator[Key], score: float,
                       limit: int | None) -> Key | None:
    """The first unvisited key of ``order`` strictly better than ``score`` (evaluating as it
    goes), or ``None`` after ``limit`` tries, the budget or the neighbourhood run out."""
    tried = 0
    for k in order:
        if k in judge.visited:
            continue
        if judge.exhausted or (limit is not None and tried >= limit):
            return None
        tried += 1
        if judge.better(judge(k).score, score):
            return k
    return None


def _take(it: Iterator[Key], n: int) -> list[Key]:
    out = []
    for k in it:
        out.append(k)
        if len(out) >= n:
            break
    return out


def _best_known(judge: Budget, keys: list[Key]) -> Key | None:
    """The key with the best score among ``keys`` (evaluating the new ones), first on ties."""
    best = None
    for k in keys:
        if best is None or judge.better(judge(k).score, judge(best).score):
            best = k
    return best


def _improves(judge: Budget, key: Key | None, score: float) -> bool:
    return key is not None and judge.better(judge(key).score, score)
