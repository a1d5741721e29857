"""What NLS trained: the configuration and the training loss of every optimizer step (or of
every micro-batch, when NLS samples per micro-batch).

The records make frequency- and loss-based heuristics possible after training (e.g. pick,
per group, the rank whose steps had the lowest mean loss).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from shears.adapters import Config


@dataclass
class NLSHistory:
    """One record per sampled sub-adapter.

    ``nls_sample_every="step"``: one record per optimizer step,
    ``{"step": int, "config": Config, "loss": float}``; ``loss`` is this process's training
    loss of the step, in the units ``Trainer`` logs (the sum over the micro-batches of
    gradient accumulation of the scaled loss).

    ``nls_sample_every="micro_batch"``: one record per micro-batch,
    ``{"step": int, "micro_batch": int, "config": Config, "loss": float}``; ``step`` is the
    optimizer step the micro-batch belongs to, ``micro_batch`` its index in the run (0, 1,
    ...), ``loss`` its share of the step's loss times the number of micro-batches in the
    step, so the mean of a step's records is the step's logged loss (equal token counts:
    the micro-batch's own mean loss). The statistics below average over records, so they
    mean "over steps" in one mode and "over micro-batches" in the other.
    """

    records: list[dict[str, Any]] = field(default_factory=list)

    def append(self, step: int, config: Config, loss: float,
               micro_batch: int | None = None) -> None:
        record: dict[str, Any] = {"step": int(step)}
        if micro_batch is not None:
            record["micro_batch"] = int(micro_batch)
        record.update(config=dict(config), loss=float(loss))
        self.records.append(record)

    def rank_counts(self) -> dict[str, dict[int, int]]:
        """Group -> rank -> how many records (steps, or micro-batches) trained that rank."""
        counts: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for rec in self.records:
            for group, rank in rec["config"].items():
                counts[group][rank] += 1
        return {g: dict(c) for g, c in counts.items()}

    def mean_loss_by_rank(self) -> dict[str, dict[int, float]]:
        """Group -> rank -> mean training loss of the records (steps, or micro-batches) in
        which the group had that rank."""
        sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for rec in self.records:
            for group, rank in rec["config"].items():
                sums[group][rank].append(rec["loss"])
        return {g: {r: sum(v) / len(v) for r, v in d.items()} for g, d in sums.items()}

    def mean_loss_by_config(self) -> list[tuple[Config, float, int]]:
        """``(config, mean loss, count)`` for every distinct sampled configuration."""
        acc: dict[str, list[float]] = defaultdict(list)
        for rec in self.records:
            acc[json.dumps(rec["config"], sort_keys=True)].append(rec["loss"])
        return [(json.loads(k), sum(v) / len(v), len(v)) for k, v in acc.items()]

    def to_dict(self) -> dict[str, Any]:
        return {"records": self.records}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NLSHistory:
        return cls(records=[dict(r) for r in data["records"]])

    def __len__(self) -> int:
        return len(self.records)
