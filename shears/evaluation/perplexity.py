"""Perplexity on non-overlapping windows, as the Wanda and SparseGPT papers measure it."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from shears.evaluation.paths import data_dir


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    progress: bool = True,
    max_windows: int | None = None,
) -> float:
    """exp(mean next-token NLL) over the non-overlapping ``seqlen`` windows of ``input_ids``.

    Args:
        model: a causal LM returning ``.logits`` of shape (batch, seqlen, vocab).
        input_ids: token ids, shape (n_tokens,) or (1, n_tokens); a trailing partial
            window is dropped.
        seqlen: window length; each window is scored on its own (no context carried over).
        batch_size: windows per forward pass.
        max_windows: score only the first ``max_windows`` windows.

    Every window contributes ``seqlen - 1`` predicted tokens, so the mean over windows of
    per-window mean NLL equals the token mean.
    """
    ids = input_ids.reshape(-1)
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"need at least {seqlen} tokens for one window, got {ids.numel()}")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64)
    starts = range(0, n_windows, batch_size)
    for start in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1),
                              reduction="sum")
        total_nll += nll.double().cpu()
    model.train(was_training)
    return math.exp(total_nll.item() / (n_windows * (seqlen - 1)))


def wikitext2_ids(tokenizer, path: str | os.PathLike | None = None) -> torch.LongTensor:
    """The raw WikiText-2 test split tokenized as one string, shape (n_tokens,).

    ``path`` is the data folder holding ``wikitext-2-raw/wiki.test.raw`` (or the file itself).
    """
    path = Path(path) if path and Path(path).is_file() else (
        data_dir(path) / "wikitext-2-raw" / "wiki.test.raw")
    text = path.read_text(encoding="utf-8")
    return tokenizer(text, return_tensors="pt").input_ids[0]
