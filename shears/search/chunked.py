"""A loss judge over batches of held-out records, that can also score one chunk of them.

The search room may not import :mod:`shears.evaluation`, so the token loss is computed here
from batches the caller builds (``InstructionCollator`` does it): dicts of (batch, seqlen)
tensors ``input_ids``, ``attention_mask`` and ``labels`` (-100 where a token is not
scored). :func:`token_loss` counts as ``evaluate_loss`` does: next-token cross-entropy
summed over label tokens, so the token-mean over any set of batches does not depend on how
they were batched.

:func:`make_chunked_evaluator` returns a judge that is a plain ``evaluate(config) -> float``
for every search, and also scores a configuration on one *chunk* of the batches, which is
what :func:`front_search` needs to race candidates on the same records (the race protocol:
``chunk_costs`` and ``chunk(config, i)``).

:func:`stratified_batches` weighs several sets of records (strata) as a mean over the sets
does, whatever their sizes, through a per-record ``weights`` entry that :func:`token_loss`
honours: a judge that weighs its tasks as the held-out mean over test sets weighs them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shears.adapters import get_config, set_config

IGNORE_INDEX = -100
# loss(model, batch) -> (sum of the per-token losses, number of tokens), 0-d device tensors
Loss = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]


def token_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
    """Summed next-token cross-entropy over the label tokens of ``batch``, and their count.

    ``batch``: ``input_ids`` (b, t), ``labels`` (b, t) with -100 where not scored, optional
    ``attention_mask`` (b, t) and optional ``weights`` (b,), a weight per record. Moved to
    the model's device here. Returns two 0-d tensors on that device (no host sync): the sum
    in fp32 (fp64 for an fp64 model) and the count. With ``weights``, every token of record
    ``i`` counts ``weights[i]`` times in both, so sum / count is the weighted token mean.
    """
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    logits = model(input_ids=ids, attention_mask=None if mask is None else mask.to(device),
                   use_cache=False).logits[:, :-1]  # (b, t - 1, vocab)
    if logits.dtype != torch.float64:
        logits = logits.float()
    targets = batch["labels"][:, 1:].to(device)  # (b, t - 1): token t + 1 is predicted at t
    weights = batch.get("weights")
    if weights is None:
        total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total, (targets != IGNORE_INDEX).sum()
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                reduction="none")  # (b, t - 1), 0 where not scored
    w = weights.to(device=device, dtype=per_token.dtype)[:, None]  # (b, 1)
    return (per_token * w).sum(), ((targets != IGNORE_INDEX) * w).sum()


def label_tokens(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(b,) label tokens per record that :func:`token_loss` scores (labels shifted by one)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)


def stratified_batches(strata: Mapping[str, Sequence[Mapping[str, torch.Tensor]]],
                       weights: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """Batches of several strata, weighted so that the judge's loss is the weighted mean
    of the strata's token-mean losses.

    Args:
        strata: name -> that stratum's batches (dicts of (b, t) tensors as
            :func:`token_loss` takes; every record of a batch belongs to its stratum).
        weights: name -> weight (default: equal); normalised to sum to 1.

    Returns the batches, each with ``weights`` (b,) = ``w_s / N_s`` for every record of
    stratum ``s`` (``N_s`` its label tokens), interleaved round-robin across strata so
    that every chunk of a race sees each of them. Then the token mean that
    :func:`make_chunked_evaluator` and :func:`rank_sensitivity` compute over all of them is
    ``sum_s w_s * loss_s``: the mean over test sets that held-out results report, where a
    plain token mean would weigh each set by its records' length and number.
    """
    strata = {n: list(b) for n, b in strata.items()}
    w = {n: 1.0 for n in strata} if weights is None else {n: float(weights[n]) for n in strata}
    if not strata or any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
        raise ValueError(f"need strata with non-negative weights of positive sum, got {w}")
    out: dict[str, list[dict[str, Any]]] = {}
    for name, batches in strata.items():
        tokens = sum(int(label_tokens(b).sum()) for b in batches)
        if tokens == 0:
            raise ValueError(f"stratum {name!r} holds no label tokens")
        share = w[name] / sum(w.values()) / tokens
        out[name] = [{**b, "weights": torch.full((b["labels"].shape[0],), share,
                                                 dtype=torch.float64)} for b in batches]
    mixed = []
    for i in range(max(len(b) for b in out.values())):
        mixed += [batches[i] for batches in out.values() if i < len(batches)]
    return mixed


def batch_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens a forward pass processes (the attention mask's ones, else every position)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


class ChunkedEvaluator:
    """``evaluate(config) -> token-mean loss`` over ``batches``, also chunk by chunk.

    Attributes:
        batches: the batches, in order.
        chunks: tuple of tuples of batch indices, contiguous, in order.
        chunk_costs: each chunk's share of a full evaluation (its tokens over all tokens
            processed); they sum to 1. This is what a race charges for scoring a chunk.

    ``chunk(config, i)`` returns ``(loss sum, label tokens)`` of chunk ``i`` under
    ``config``; ``evaluate(config)`` is the sum of the sums over the sum of the counts, i.e.
    ``evaluate_loss`` over the same records. Both activate ``config`` and restore the
    configuration active before, and run under ``torch.no_grad`` in eval mode.
    """

    def __init__(self, model: nn.Module, batches: Iterable[Any], chunks: int | None = None,
                 loss: Loss | None = None) -> None:
        self.model, self.batches = model, list(batches)
        if not self.batches:
            raise ValueError("no batches to evaluate on")
        n = len(self.batches) if chunks is None else chunks
        if not 1 <= n <= len(self.batches):
            raise ValueError(f"chunks must be between 1 and the {len(self.batches)} batches, "
                             f"got {chunks}")
        self.loss = loss or token_loss
        self.chunks = tuple(tuple(int(i) for i in part)
                            for part in np.array_split(np.arange(len(self.batches)), n))
        tokens = [sum(batch_tokens(self.batches[i]) for i in part) for part in self.chunks]
        self.chunk_costs = tuple(t / sum(tokens) for t in tokens)

    def chunk(self, config: Mapping[str, int], i: int) -> tuple[float, float]:
        """``(summed loss, label tokens)`` of chunk ``i`` under ``config``."""
        previous = get_config(self.model)
        was_training = self.model.training
        set_config(self.model, config)
        self.model.eval()
        try:
            with torch.no_grad():
                parts = [self.loss(self.model, self.batches[b]) for b in self.chunks[i]]
                total = torch.stack([s.double() for s, _ in parts]).sum()
                count = torch.stack([c.double() for _, c in parts]).sum()
            return float(total), float(count)
        finally:
            set_config(self.model, previous)
            self.model.train(was_training)

    def __call__(self, config: Mapping[str, int]) -> float:
        return mean_of([self.chunk(config, i) for i in range(len(self.chunks))])


def mean_of(parts: Sequence[tuple[float, float]]) -> float:
    """Token mean of ``(sum, count)`` pairs; NaN when nothing was counted."""
    count = sum(c for _, c in parts)
    return sum(s for s, _ in parts) / count if count else float("nan")


def make_chunked_evaluator(model: nn.Module, batches: Iterable[Any], chunks: int | None = None,
                           loss: Loss | None = None) -> ChunkedEvaluator:
    """A judge of token-mean loss over ``batches`` that races can score chunk by chunk.

    Args:
        model: a causal LM carrying elastic adapters.
        batches: dicts of (b, t) tensors ``input_ids``, ``labels`` (-100: not scored) and
            ``attention_mask``, e.g. ``InstructionCollator(tok)(rows[i:i + 4])`` over
            ``instruction_dataset`` rows with the prompt masked (``train_on_inputs=False``);
            or anything ``loss`` accepts.
        chunks: how many contiguous chunks the batches form (default: one per batch). A
            race (``front_search``) scores candidates chunk by chunk, all on the same records.
        loss: ``loss(model, batch) -> (sum, count)`` as 0-d tensors; default
            :func:`token_loss`.
    """
    return ChunkedEvaluator(model, batches, chunks, loss)
