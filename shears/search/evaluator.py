"""The judge of a search: ``evaluate(config) -> float``, its budget, cache and history.

:func:`make_evaluator` turns a model metric into such a judge. :class:`Budget` is what both
searches call instead of ``evaluate`` directly: it evaluates each configuration at most
once, counts every configuration the search visits against the budget, takes values
from a resumed history for free and, given a checkpoint path, saves the search so far after
every evaluation.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from shears.adapters import adapter_parameters, get_config, set_config

from .result import Config, Evaluation, SearchResult, SearchSpace
from .space import Key, decode, encode

Evaluate = Callable[[Config], float]
Cost = Callable[[Config], float]
Resume = SearchResult | str | os.PathLike | None
Checkpoint = str | os.PathLike | None


def make_evaluator(model: nn.Module, fn: Callable[[nn.Module], float]) -> Evaluate:
    """Turn ``fn(model) -> float`` into ``evaluate(config) -> float``.

    ``evaluate`` activates the sub-adapter ``config`` on ``model``, calls ``fn`` and
    restores the configuration that was active before, even when ``fn`` raises.
    """

    def evaluate(config: Mapping[str, int]) -> float:
        previous = get_config(model)
        set_config(model, config)
        try:
            return float(fn(model))
        finally:
            set_config(model, previous)

    return evaluate


def load_prior(resume: Resume, checkpoint: Checkpoint = None) -> SearchResult | None:
    """A saved search to resume from: a result, a path to its JSON, or ``None``.

    A ``resume`` path that does not exist yet is a fresh start when it is also the
    ``checkpoint`` path, so that one command both starts a search and continues it after
    a kill; any other missing path is an error.
    """
    if resume is None or isinstance(resume, SearchResult):
        return resume
    if checkpoint is not None and not Path(resume).exists() and _same_path(resume, checkpoint):
        return None
    return SearchResult.load(resume)


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


class Budget:
    """Spends at most ``budget`` evaluations, one per distinct configuration visited.

    A search asks for keys (rank indices); a key it has visited before costs nothing. A
    key found in the ``prior`` (resumed) history is counted as visited but not evaluated
    again, so a resumed search with the same seed retraces the interrupted one exactly and
    only pays for what comes after.

    With ``checkpoint``, the result so far (``method``, ``settings``, the prior history
    and every new evaluation) is written there atomically after each new evaluation: a
    kill leaves the previous complete file, never a half one.
    """

    def __init__(self, space: SearchSpace, evaluate: Evaluate, budget: int, *,
                 model: nn.Module | None = None, cost: Cost | None = None,
                 prior: SearchResult | None = None, maximize: bool = True,
                 progress: bool = True, desc: str = "search", checkpoint: Checkpoint = None,
                 method: str = "", settings: dict[str, Any] | None = None) -> None:
        if budget < 1:
            raise ValueError(f"budget must be at least 1, got {budget}")
        self.space, self.evaluate, self.budget = space, evaluate, int(budget)
        self.model, self.cost, self.maximize = model, cost, maximize
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.method, self.settings = method, dict(settings or {})
        self.prior: list[Evaluation] = list(prior.history) if prior is not None else []
        if prior is not None and prior.maximize != maximize:
            then, now = ("maximis" if m else "minimis" for m in (prior.maximize, maximize))
            raise ValueError(
                f"cannot resume: the saved search {then}ed its score (maximize="
                f"{prior.maximize}) but this one {now}es it (maximize={maximize}); pass "
                f"maximize={prior.maximize} to continue it")
        # encode() also checks that the resumed history belongs to this search space
        self.known = {encode(space, e.config): e for e in self.prior}
        self.visited: dict[Key, Evaluation] = {}
        self._best: float | None = None
        self._bar = tqdm(total=self.budget, desc=desc, disable=not progress)

    @property
    def spent(self) -> int:
        return len(self.visited)

    @property
    def exhausted(self) -> bool:
        return self.spent >= self.budget

    def __call__(self, key: Key) -> Evaluation:
        """The evaluation of ``key``; evaluates it when new (check ``exhausted`` first)."""
        if key in self.visited:
            return self.visited[key]
        if self.exhausted:
            raise RuntimeError("evaluation budget exhausted")
        new = key not in self.known
        entry = self._complete(self._evaluate(key) if new else self.known[key])
        self.visited[key] = entry
        if new and self.checkpoint is not None:
            self.snapshot().save(self.checkpoint)
        self._bar.update(1)
        if self._best is None or self.better(entry.score, self._best):
            self._best = entry.score
            self._bar.set_postfix(best=f"{entry.score:.4g}")
        return entry

    def better(self, a: float, b: float) -> bool:
        """Strictly better; a NaN score is worse than any number."""
        if math.isnan(a) or math.isnan(b):
            return not math.isnan(a)
        return a > b if self.maximize else a < b

    def _evaluate(self, key: Key) -> Evaluation:
        config = decode(self.space, key)
        start = time.perf_counter()
        score = float(self.evaluate(dict(config)))  # a copy: the judge may not alter ours
        return Evaluation(config, score, seconds=time.perf_counter() - start)

    def _complete(self, entry: Evaluation) -> Evaluation:
        """Fill in adapter parameters and cost (both cheap) when they are missing."""
        if entry.params is None and self.model is not None:
            entry = replace(entry, params=adapter_parameters(self.model, entry.config))
        if entry.cost is None and self.cost is not None:
            entry = replace(entry, cost=float(self.cost(dict(entry.config))))
        return entry

    def snapshot(self) -> SearchResult:
        """The search so far: the resumed history (completed where this run revisited it)
        then the new evaluations, in the order they were made."""
        history = [self.visited.get(k, e) for k, e in self.known.items()]
        history += [e for k, e in self.visited.items() if k not in self.known]
        return SearchResult(space=self.space, history=history, maximize=self.maximize,
                            method=self.method, settings=dict(self.settings))

    def result(self, method: str | None = None,
               settings: dict[str, Any] | None = None) -> SearchResult:
        """The final :meth:`snapshot` (also written to the checkpoint, if any); ``method``
        and ``settings`` replace those given at construction."""
        self._bar.close()
        if method is not None:
            self.method = method
        if settings is not None:
            self.settings = dict(settings)
        result = self.snapshot()
        if self.checkpoint is not None:
            result.save(self.checkpoint)
        return result
