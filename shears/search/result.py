"""What a sub-adapter search returns: every evaluation it made, the best one, the front.

A :class:`SearchResult` is plain data and round-trips through JSON, so a search can be
inspected, plotted, compared, or resumed (``hill_climb(..., resume=path)``) later.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from shears.atomic import read_json, write_text

from .pareto import pareto_mask

SearchSpace = dict[str, list[int]]
Config = dict[str, int]


# Standard JSON has no NaN or infinity: ``save`` writes these strings (the spellings of
# JavaScript and of Python's json module), read back wherever a float may stand: an
# evaluation's score, cost and seconds, and any value inside ``settings``.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_FLOAT_FIELDS = ("score", "cost", "seconds")


def _to_json(x: Any) -> Any:
    """``x`` with every non-finite float replaced by its string in ``_NON_FINITE``."""
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, dict):
        return {k: _to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_json(v) for v in x]
    return x


def _from_json(x: Any) -> Any:
    """The inverse of ``_to_json``."""
    if isinstance(x, str):
        return _NON_FINITE.get(x, x)
    if isinstance(x, dict):
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


@dataclass(frozen=True)
class Evaluation:
    """One evaluated sub-adapter.

    Attributes:
        config: the configuration (group -> rank).
        score: what ``evaluate(config)`` returned.
        params: adapter parameters active under ``config`` (``None`` when the search was
            given a bare search space rather than a model).
        seconds: wall time of the ``evaluate`` call.
        cost: the second objective of a multi-objective search (``None`` otherwise).
    """

    config: Config
    score: float
    params: int | None = None
    seconds: float = 0.0
    cost: float | None = None

    @property
    def objective_cost(self) -> float | None:
        """The cost axis: ``cost`` when the search had one, else ``params``."""
        return self.cost if self.cost is not None else self.params


@dataclass
class SearchResult:
    """Every evaluation of a search, in the order it was made.

    Attributes:
        space: the search space (group -> descending rank list).
        history: the evaluations; no configuration appears twice.
        maximize: whether a larger score is better.
        method: the search that produced it (``"hill_climb"``, ``"nsga2"``, ...).
        settings: its arguments worth keeping (seed, budget, reference points, ...).
    """

    space: SearchSpace
    history: list[Evaluation] = field(default_factory=list)
    maximize: bool = True
    method: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> Evaluation:
        """The best evaluation (the first one on ties); NaN scores never win."""
        valid = [e for e in self.history if not math.isnan(e.score)]
        if not valid:
            raise ValueError("the search holds no evaluation with a valid score")
        sign = 1.0 if self.maximize else -1.0
        return max(valid, key=lambda e: sign * e.score)  # max keeps the first of ties

    @property
    def best_config(self) -> Config:
        return dict(self.best.config)

    @property
    def best_score(self) -> float:
        return self.best.score

    @property
    def pareto_front(self) -> list[Evaluation]:
        """Evaluations that no other dominates on (score, cost), sorted by cost.

        Cost is ``Evaluation.cost`` or, failing that, the adapter parameters; evaluations
        with neither, or with a NaN score, take no part.
        """
        pool = [e for e in self.history
                if e.objective_cost is not None and not math.isnan(e.score)]
        if not pool:
            return []
        sign = -1.0 if self.maximize else 1.0
        F = np.array([[sign * e.score, e.objective_cost] for e in pool], dtype=float)
        front = [e for e, keep in zip(pool, pareto_mask(F), strict=True) if keep]
        return sorted(front, key=lambda e: (e.objective_cost, sign * e.score))

    def to_dict(self) -> dict[str, Any]:
        """Plain Python data (non-finite scores stay floats; ``save`` spells them out)."""
        return {
            "method": self.method,
            "maximize": self.maximize,
            "space": self.space,
            "settings": self.settings,
            "history": [asdict(e) for e in self.history],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchResult:
        """The inverse of ``to_dict``; also reads the strings ``save`` writes for NaN/inf."""
        history = [Evaluation(**{k: _from_json(v) if k in _FLOAT_FIELDS else v
                                 for k, v in e.items()}) for e in data["history"]]
        return cls(space={g: list(r) for g, r in data["space"].items()}, history=history,
                   maximize=bool(data.get("maximize", True)), method=data.get("method", ""),
                   settings=_from_json(dict(data.get("settings", {}))))

    def save(self, path: str | os.PathLike) -> None:
        """Write the result as standard JSON: a NaN or infinite number (a failed evaluation,
        an infinite cost) is written as the string ``"NaN"``, ``"Infinity"`` or
        ``"-Infinity"``, which strict parsers accept and ``load`` turns back into the float.

        The write is atomic (``shears.atomic``): a temporary file beside ``path``, fsynced,
        then renamed over it, so an interrupted save leaves the previous file whole."""
        write_text(path, json.dumps(_to_json(self.to_dict()), indent=1, allow_nan=False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchResult:
        """Read a saved result; files with bare ``NaN`` tokens (earlier versions wrote
        them) load too. A truncated, corrupt or foreign file raises a ``ValueError`` that
        names it."""
        data = read_json(path, "search result")
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"search result {path} is not a saved SearchResult "
                             f"({type(e).__name__}: {e})") from e

    def __repr__(self) -> str:
        scores = [e.score for e in self.history if not math.isnan(e.score)]
        best = f", best_score={self.best_score:.6g}" if scores else ""
        return f"SearchResult(method={self.method!r}, evaluations={len(self.history)}{best})"
