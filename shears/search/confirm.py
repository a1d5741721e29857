"""Confirm a search's pick on records the search never saw, against a reference sub-adapter.

A search that picks the best of many configurations on one judge overfits that judge: the
winner's advantage is partly the judge's noise, and a sensitivity-driven search chooses
among far more configurations than it evaluates (the knapsack of :func:`allocate` weighs
every group's rank at once), so even a paired standard error on the judge's own records
understates it. On SmolLM2 (docs/search.md) front_search beat the heuristic by 0.009 of
validation loss, 5.6 paired standard errors over the judge's chunks, and lost 0.0036 on the
held-out test sets. The remedy is the statistician's: score the pick again on fresh records
and keep it only if it still wins there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from .evaluator import Evaluate
from .result import Config, SearchResult


@dataclass(frozen=True)
class Confirmation:
    """What :func:`confirm_pick` decided.

    Attributes:
        config: the sub-adapter to use: the confirmed candidate, or the reference.
        accepted: whether a candidate replaced the reference.
        score: ``config``'s score on the confirmation judge (``None`` if nothing was
            evaluated: no candidate beat the reference on the search's own judge).
        search_score: ``config``'s score in the search (``None`` for a reference the search
            did not evaluate).
        scores: ``{"reference": float | None, "candidates": [float, ...]}`` on the
            confirmation judge, candidates in the search's order (best first).
        candidates: the candidates' configurations, in that order.
    """

    config: Config
    accepted: bool
    score: float | None
    search_score: float | None
    scores: dict = field(default_factory=dict)
    candidates: list[Config] = field(default_factory=list)


def confirm_pick(result: SearchResult, evaluate: Evaluate, reference: Mapping[str, int], *,
                 top: int = 1, margin: float = 0.0,
                 max_params: int | None = None) -> Confirmation:
    """The search's best configuration if it also beats ``reference`` on a fresh judge.

    Args:
        result: a search's result (its ``maximize`` says which way is better).
        evaluate: the confirmation judge, e.g. ``make_chunked_evaluator`` over records that
            neither the training nor the search's judge used. Called ``top + 1`` times at
            most: the reference, then each candidate.
        reference: the sub-adapter to beat, usually ``heuristic_config(model)``.
        top: how many of the search's best configurations (within ``max_params``, better
            than the reference in the search, the reference excluded) are confirmed; the
            best of them on the confirmation judge is the candidate.
        margin: how much better than the reference the candidate must score there.
        max_params: ignore history entries with more adapter parameters.

    Returns:
        A :class:`Confirmation`; ``config`` is ``reference`` unless a candidate wins.
    """
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    sign = -1.0 if result.maximize else 1.0  # sign * score: lower is better
    reference = dict(reference)
    ref_entry = next((e for e in result.history if e.config == reference), None)
    bar = math.inf if ref_entry is None else sign * ref_entry.score
    pool = [e for e in result.history if e.config != reference and not math.isnan(e.score)
            and (max_params is None or e.params is None or e.params <= max_params)
            and sign * e.score < bar]
    pool = sorted(pool, key=lambda e: sign * e.score)[:top]  # stable: first of ties first
    search_ref = None if ref_entry is None else ref_entry.score
    if not pool:
        return Confirmation(reference, False, None, search_ref,
                            {"reference": None, "candidates": []}, [])
    ref_score = float(evaluate(reference))
    scores = [float(evaluate(dict(e.config))) for e in pool]
    best = min(range(len(pool)), key=lambda i: (math.inf if math.isnan(scores[i])
                                                else sign * scores[i], i))
    accepted = sign * scores[best] < sign * ref_score - margin
    chosen = pool[best] if accepted else None
    return Confirmation(
        config=dict(chosen.config) if chosen else reference, accepted=accepted,
        score=scores[best] if accepted else ref_score,
        search_score=chosen.score if chosen else search_ref,
        scores={"reference": ref_score, "candidates": scores},
        candidates=[dict(e.config) for e in pool])
