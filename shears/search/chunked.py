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
    ``attention_mask`` (b, t). Moved to the model's device here. Returns two 0-d tensors on
    that device (no host sync): the sum in fp32 (fp64 for an fp64 model) and the count.
    """
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    logits = model(input_ids=ids, attention_mask=None if mask is None else mask.to(device),
                   use_cache=False).logits[:, :-1]  # (b, t - 1, vocab)
    if logits.dtype != torch.float64:
        logits = logits.float()
    targets = batch["labels"][:, 1:].to(device)  # (b, t - 1): token t + 1 is predicted at t
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()


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
                count = torch.stack([c for _, c in parts]).sum()
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
