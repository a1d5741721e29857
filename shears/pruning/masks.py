"""Scores and masks. A mask is a bool tensor shaped like the (out, in) weight, True = zero it."""

from __future__ import annotations

import re

import torch


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M) with 0 < N < M.

    Raises:
        ValueError: for anything else ("2-4", "3:2", "0:4", ...).
    """
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M (N of every M weights are zeroed)")
    return n, m


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||_2, in fp32.

    Args:
        weight: (out, in) weight.
        input_sq_norm: (in,) per-channel statistic: mean over sequences of sum_tokens x^2.
    Returns:
        (out, in) fp32 scores, compared within each output row.
    """
    return weight.abs().float() * input_sq_norm.float().sqrt().unsqueeze(0)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| in fp32, the baseline score."""
    return weight.abs().float()


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, the ``int(in * sparsity)`` lowest scores (stable sort, so ties fall
    to the lower column index, as in the reference implementation)."""
    k = int(scores.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        lowest = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, lowest, True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In each block of ``m`` consecutive input columns of a row, the ``n`` lowest scores."""
    out_features, in_features = scores.shape
    if in_features % m:
        raise ValueError(f"in_features={in_features} is not a multiple of M={m}")
    blocks = scores.reshape(out_features, in_features // m, m)
    lowest = torch.sort(blocks, dim=2, stable=True).indices[..., :n]
    mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(2, lowest, True)
    return mask.reshape(out_features, in_features)
