"""Budgeted hill-climbing over sub-adapters, the search the Shears paper reports best.

From the heuristic sub-adapter, look at the neighbours (one group one step up or down its
rank list) and move to the best of them only when it is strictly better. On a local
optimum or plateau, restart from a random configuration not yet visited. Every
configuration is evaluated at most once, and the best ever seen is returned, which is
what the authors' notebook did not do (it always moved, and kept the last configuration).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from torch import nn

from shears.adapters import heuristic_config

from .evaluator import Budget, Evaluate, Resume, load_prior
from .result import SearchResult
from .space import Key, encode, neighbour_keys, random_unvisited, resolve


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
) -> SearchResult:
    """Hill-climb with random restarts for the best sub-adapter, within ``budget`` evaluations.

    Args:
        space_or_model: a model carrying elastic adapters (the history then records the
            adapter parameters of each sub-adapter) or a search space dict.
        evaluate: ``evaluate(config) -> float``, e.g. from :func:`make_evaluator`.
        start: first configuration; the heuristic sub-adapter by default.
        budget: most distinct configurations evaluated, resumed ones included. Fewer are
            spent only when the whole space has been visited.
        seed: seeds the neighbour subsets and the restarts.
        maximize: whether a larger score is better.
        neighbours: when a configuration has more unvisited neighbours than this, evaluate
            a random subset of this size at a time (the next subset only if none of them
            improves). ``None``: all of them.
        progress: show a tqdm bar.
        resume: a saved result (or its JSON path). With the same arguments the search
            retraces it without re-evaluating anything and continues where it stopped.

    Returns:
        A :class:`SearchResult` whose ``best_config`` is the best configuration ever seen.
    """
    if neighbours is not None and neighbours < 1:
        raise ValueError(f"neighbours must be at least 1, got {neighbours}")
    space, model = resolve(space_or_model)
    rng = np.random.default_rng(seed)
    judge = Budget(space, evaluate, budget, model=model, prior=load_prior(resume),
                   maximize=maximize, progress=progress, desc="hill-climb")
    key: Key | None = encode(space, heuristic_config(space) if start is None else start)
    while key is not None and not judge.exhausted:
        _climb(space, judge, key, rng, neighbours)
        key = random_unvisited(space, set(judge.visited), rng)
    settings = {"budget": budget, "seed": seed, "neighbours": neighbours,
                "start": None if start is None else dict(start)}
    return judge.result("hill_climb", settings)


def _climb(space, judge: Budget, key: Key, rng: np.random.Generator, limit: int | None) -> None:
    """Climb from ``key`` until no neighbour is strictly better or the budget runs out."""
    current = judge(key)
    while True:
        nearby = neighbour_keys(space, key)
        # Neighbours already visited are known for free and may still be the better move.
        best_key = _best_known(judge, [k for k in nearby if k in judge.visited])
        fresh = [nearby[i] for i in rng.permutation(len(nearby)) if nearby[i] not in judge.visited]
        step = len(fresh) if limit is None else limit
        while not _improves(judge, best_key, current.score) and fresh and not judge.exhausted:
            batch, fresh = fresh[:step], fresh[step:]
            batch = batch[: judge.budget - judge.spent]
            best_key = _best_known(judge, batch if best_key is None else [best_key, *batch])
        if not _improves(judge, best_key, current.score):
            return  # a local optimum (or plateau), or no budget left to find out
        key, current = best_key, judge(best_key)


def _best_known(judge: Budget, keys: list[Key]) -> Key | None:
    """The key with the best score among ``keys`` (evaluating the new ones), first on ties."""
    best = None
    for k in keys:
        if best is None or judge.better(judge(k).score, judge(best).score):
            best = k
    return best


def _improves(judge: Budget, key: Key | None, score: float) -> bool:
    return key is not None and judge.better(judge(key).score, score)
