"""The WikiText-2 protocol of bench_prune.py (issue #2), shared by the perplexity benchmarks.

WikiText-2 test tokenized as one string; 32 calibration windows of 256 tokens drawn (seed 0)
from the second half; perplexity windows taken from the first half, so that no calibration
token is scored.
"""

from __future__ import annotations

import torch

from shears.evaluation.perplexity import wikitext2_ids


def protocol_ids(tok, data) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, calib, ppl_ids)``: all test ids (n,), calibration (32, 256), the first half."""
    ids = wikitext2_ids(tok, data)
    half = ids.numel() // 2
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(half, ids.numel() - 257, (32,), generator=g)
    calib = torch.stack([ids[s : s + 256] for s in starts.tolist()])
    return ids, calib, ids[:half]
