"""A budget-aware search: race the estimated front, then refine the winner by an ordered climb.

1. The estimated front (:func:`estimated_front` of a :class:`RankSensitivity`) proposes, at
   every size, the sub-adapter the first-order estimate likes best. Its members within
   ``max_params`` are the candidates, most promising (least estimated loss) first.
2. The heuristic sub-adapter is always evaluated in full: the reference the result can
   never be worse than.
3. The candidates race by successive halving on the same records: all of them on the first
   chunk of the judge's records, the better half on the first two chunks, ..., the
   ``finalists`` on all of them. A judge that cannot score chunks (a plain ``evaluate``)
   races in full evaluations.
4. What is left of the budget goes to :func:`hill_climb` from the best configuration found,
   neighbours ordered by the estimate, every visited configuration within ``max_params``.

The budget is counted in full-evaluation equivalents: scoring a chunk costs its share of
the judge's tokens (``chunk_costs``), a score already computed costs nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from shears.adapters import adapter_parameters, heuristic_config

from .allocate import estimated_front
from .chunked import ChunkedEvaluator, mean_of
from .evaluator import Evaluate
from .hill_climb import hill_climb
from .result import Config, Evaluation, SearchResult
from .sensitivity import RankSensitivity, rank_sensitivity
from .space import encode, resolve


class Race:
    """Scores configurations chunk by chunk, each chunk at most once, charging its cost.

    A judge with ``chunk_costs`` (shares of a full evaluation, summing to 1) and
    ``chunk(config, i) -> (sum, count)`` is raced chunk by chunk (:class:`ChunkedEvaluator`
    is one); any other ``evaluate(config) -> float`` is one chunk of cost 1.
    """

    def __init__(self, space: dict[str, list[int]], evaluate: Evaluate, bar: tqdm) -> None:
        self.space, self.evaluate, self.bar = space, evaluate, bar
        if hasattr(evaluate, "chunk") and hasattr(evaluate, "chunk_costs"):
            self.costs = [float(c) for c in evaluate.chunk_costs]
        else:
            self.costs = [1.0]
        if not self.costs or min(self.costs) < 0 or not math.isclose(sum(self.costs), 1.0):
            raise ValueError(f"chunk_costs must be shares >= 0 summing to 1, got {self.costs}")
        self.memo: dict[tuple, tuple[float, float]] = {}
        self.seconds: dict[tuple, float] = {}
        self.spent = 0.0

    @property
    def chunks(self) -> int:
        return len(self.costs)

    def cost(self, upto: int, start: int = 0) -> float:
        return sum(self.costs[start:upto])

    def partial(self, config: Mapping[str, int], upto: int) -> float:
        """Token mean over chunks ``0 .. upto - 1`` (NaN for a NaN chunk)."""
        key = encode(self.space, config)
        for i in range(upto):
            if (key, i) not in self.memo:
                start = time.perf_counter()
                if len(self.costs) == 1:
                    value = (float(self.evaluate(dict(config))), 1.0)
                else:
                    value = tuple(float(x) for x in self.evaluate.chunk(dict(config), i))
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
                self.memo[key, i] = value
                self.spent += self.costs[i]
                self.bar.update(self.costs[i])
        return mean_of([self.memo[key, i] for i in range(upto)])

    def full(self, config: Mapping[str, int]) -> float:
        return self.partial(config, self.chunks)


def halving_schedule(n: int, finalists: int, chunks: int) -> list[tuple[int, int]]:
    """Rounds of successive halving: ``(chunks scored, survivors after)`` per round, ending
    with the finalists on every chunk. Each round halves the field (down to ``finalists``)
    and, towards the end, doubles the chunks: the last-but-one round scores
    ``chunks // 2``, the one before ``chunks // 4``, ..., at least 1."""
    rounds, field = [], n
    while field > finalists:
        field = max(finalists, math.ceil(field / 2))
        rounds.append(field)
    plan = [(max(1, chunks >> (len(rounds) - k)), keep) for k, keep in enumerate(rounds)]
    return plan + [(chunks, min(n, finalists))]


def race_cost(race: Race, n: int, finalists: int) -> float:
    """Full-evaluation equivalents the schedule of ``n`` fresh candidates spends."""
    total, field, done = 0.0, n, 0
    for upto, keep in halving_schedule(n, finalists, race.chunks):
        total += field * race.cost(upto, done) if upto > done else 0.0
        field, done = keep, max(done, upto)
    return total


def front_search(model: nn.Module, evaluate: Evaluate, budget: float = 32,
                 max_params: int | None = None, *, sensitivity: RankSensitivity | None = None,
                 race_share: float = 0.5, finalists: int = 2, seed: int = 0,
                 progress: bool = True) -> SearchResult:
    """The best sub-adapter within ``max_params`` for ``budget`` evaluations of a loss.

    Args:
        model: the model carrying the trained super-adapter.
        evaluate: the judge, a loss (lower is better). ``make_chunked_evaluator(model,
            batches)`` races candidates chunk by chunk on the same records; a plain
            ``evaluate(config) -> float`` (e.g. ``make_evaluator``) works too, racing in
            full evaluations.
        budget: full-evaluation equivalents for everything (heuristic, race, climb).
        max_params: the most adapter parameters a visited sub-adapter may have (``None``:
            no limit). The heuristic is evaluated whenever it fits.
        sensitivity: from :func:`rank_sensitivity`. By default computed on the judge's
            batches when the judge is a :class:`ChunkedEvaluator` (one backward pass per
            batch, outside the budget; its time is in ``settings``).
        race_share: the part of the budget the heuristic and the race may spend; the rest
            (and whatever the race leaves) goes to the climb.
        finalists: candidates that race to a full evaluation.
        seed: seeds the climb (the race is deterministic).
        progress: tqdm bars.

    Returns:
        A :class:`SearchResult` (``method="front_search"``, minimising) whose history holds
        every full evaluation: the heuristic, the finalists, then the climb's.
        ``settings["race"]`` records every partial score of the race; ``settings["spent"]``
        the full-evaluation equivalents spent (at most ``budget``).
    """
    if budget < 1:
        raise ValueError(f"budget must be at least 1 evaluation, got {budget}")
    if not 0 < race_share <= 1:
        raise ValueError(f"race_share must be in (0, 1], got {race_share}")
    if finalists < 1:
        raise ValueError(f"finalists must be at least 1, got {finalists}")
    space, _ = resolve(model)
    sensitivity, sens_seconds = _sensitivity(model, evaluate, sensitivity, progress)
    heuristic = heuristic_config(space)
    fits = max_params is None or adapter_parameters(model, heuristic) <= max_params
    front = [p for p in estimated_front(model, sensitivity)
             if (max_params is None or p.params <= max_params) and p.config != heuristic]
    if not front and not fits:
        raise ValueError(f"no sub-adapter fits max_params={max_params}")
    pool = [p.config for p in sorted(front, key=lambda p: (p.estimated_loss, p.params))]

    bar = tqdm(total=float(budget), desc="front search: race", disable=not progress)
    race = Race(space, evaluate, bar)
    full: list[Config] = []
    if fits:
        race.full(heuristic)
        full.append(heuristic)
    allowance = budget * race_share - race.spent
    n = max((k for k in range(len(pool) + 1) if race_cost(race, k, finalists) <= allowance),
            default=0)
    records = _run_race(race, pool[:n], finalists)
    full += [c for c in (r["config"] for r in records if r["chunks"] == race.chunks)
             if c not in full]
    bar.close()
    history = [_entry(model, race, c) for c in full]
    settings: dict[str, Any] = {
        "budget": budget, "max_params": max_params, "race_share": race_share,
        "finalists": finalists, "seed": seed, "candidates": n, "front": len(pool),
        "chunks": race.chunks, "race": records, "sensitivity_method": sensitivity.method,
        "sensitivity_seconds": sens_seconds,
        "heuristic": history[0].score if fits else None}
    result = SearchResult(space=space, history=history, maximize=False,
                          method="front_search", settings=settings)
    result = _refine(model, race, result, budget, max_params, sensitivity, seed, progress)
    result.settings = {**settings, **result.settings, "spent": race.spent}
    result.method = "front_search"
    return result


def _sensitivity(model, evaluate, sensitivity, progress) -> tuple[RankSensitivity, float]:
    if sensitivity is not None:
        return sensitivity, 0.0
    if not isinstance(evaluate, ChunkedEvaluator):
        raise ValueError("pass sensitivity=rank_sensitivity(model, batches), or a judge from "
                         "make_chunked_evaluator, whose batches it is computed on")
    start = time.perf_counter()
    sens = rank_sensitivity(model, evaluate.batches, loss=evaluate.loss, progress=progress)
    return sens, time.perf_counter() - start


def _run_race(race: Race, pool: list[Config], finalists: int) -> list[dict[str, Any]]:
    """Successive halving over ``pool`` (in its order, which breaks ties); every score."""
    records, field = [], list(pool)
    for k, (upto, keep) in enumerate(halving_schedule(len(pool), finalists, race.chunks)):
        scored = [(race.partial(c, upto), i, c) for i, c in enumerate(field)]
        records += [{"round": k, "chunks": upto, "score": s, "config": c} for s, _, c in scored]
        scored.sort(key=lambda t: (math.inf if math.isnan(t[0]) else t[0], t[1]))
        field = [c for _, _, c in scored[:keep]]
    return records


def _entry(model: nn.Module, race: Race, config: Config) -> Evaluation:
    key = encode(race.space, config)
    return Evaluation(dict(config), race.full(config), params=adapter_parameters(model, config),
                      seconds=race.seconds.get(key, 0.0))


def _refine(model, race: Race, result: SearchResult, budget: float, max_params, sensitivity,
            seed: int, progress: bool) -> SearchResult:
    """The ordered climb from the best configuration while budget remains.

    The climb counts one evaluation per distinct configuration it visits, but one the race
    has scored costs less (nothing, or the chunks it lacks). So it runs on what is left, and
    is resumed with more whenever that left real budget (``race.spent``): a resumed climb
    retraces its run for free and continues. Its budget starts at 1 + what is left (its
    start is known), so the real cost never exceeds ``budget``. It stops when less than one
    evaluation is left or a round adds nothing (the feasible space is visited)."""
    start, climb_budget, climbed = result.best_config, 1, None
    while True:
        extra = math.floor(budget - race.spent + 1e-9)
        if extra < 1:
            break
        climb_budget += extra
        before = (len(result.history), race.spent)
        climbed = hill_climb(model, race.full, start=start, budget=climb_budget, seed=seed,
                             maximize=False, progress=progress, resume=result,
                             estimate=sensitivity.estimate, max_params=max_params)
        result = climbed
        if (len(result.history), race.spent) == before:
            break
    if climbed is not None:
        result.settings = {"climb": climbed.settings}
    return result
