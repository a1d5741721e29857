"""The symmetric per-group integer grid: scales, quantize, dequantize, and its straight-through
fake quantization (QA-SparsePEFT).

A weight ``W`` (out, in) is cut along the input dimension into groups of ``group_size``
columns; group ``g`` of row ``o`` has one scale ``s[o, g]`` and its entries are
``q * s[o, g]`` with ``q`` an integer in ``[-2^(bits-1), 2^(bits-1) - 1]`` (``[-8, 7]`` for
INT4): the symmetric format of compressed-tensors (no zero point), so ``0 -> q = 0 -> 0``
and every zero of a pruned base stays an exact zero. Round-to-nearest takes
``s = max|W_group| / (2^(bits-1) - 1)``, so the largest entry is represented exactly (±7 s).

Quantizing divides in fp32 whatever the weight dtype, so a weight already on the grid
(``q * s`` rounded to bf16) returns the same ``q``; dequantizing multiplies in fp32 and
rounds once to the scale's dtype, as compressed-tensors' ``dequantize`` does.
"""

from __future__ import annotations

import torch

BITS = (4, 8)


def int_range(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of a signed ``bits``-bit integer: (-8, 7) for 4 bits."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {list(BITS)}, got {bits!r}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def expand_scale(scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in // group_size) -> (out, in): each scale repeated over its group's columns."""
    return scale.repeat_interleave(group_size, dim=1)


def _check_groups(w: torch.Tensor, group_size: int) -> None:
    if group_size < 1 or w.shape[1] % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={w.shape[1]}")


def group_scales(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest scales of ``w`` (out, in): (out, in // group_size) in ``w.dtype``.

    ``max|w|`` of each group over ``qmax``; an all-zero group (a fully pruned stretch) gets
    scale 1, which represents its zeros exactly and avoids a division by zero.
    """
    _check_groups(w, group_size)
    qmax = int_range(bits)[1]
    absmax = w.detach().float().abs().reshape(w.shape[0], -1, group_size).amax(dim=-1)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    return scale.to(w.dtype)


def quantize(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers (out, in) int8 of ``w`` (out, in) on the grid of ``scale`` (out, n_groups):
    ``clamp(round(w / s), qmin, qmax)``, divided in fp32."""
    qmin, qmax = int_range(bits)
    group_size = w.shape[1] // scale.shape[1]
    _check_groups(w, group_size)
    s = expand_scale(scale.float(), group_size)
    return torch.round(w.float() / s).clamp_(qmin, qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Weights (out, in) ``q * s`` in ``scale.dtype`` (product in fp32, rounded once)."""
    group_size = q.shape[1] // scale.shape[1]
    return (q.float() * expand_scale(scale.float(), group_size)).to(scale.dtype)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``scale.dtype``: the nearest grid point of every entry
    (clamped at the ends). No gradient: see :func:`fake_quantize_ste`."""
    return dequantize(quantize(w, scale, bits), scale)


class _FakeQuantizeSTE(torch.autograd.Function):
    """Forward the grid point exactly; backward the incoming gradient unchanged."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        return fake_quantize(w, scale, bits).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def fake_quantize_ste(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Forward: ``fake_quantize(w)`` (as ``w.dtype``), exactly the weights a merge writes;
    backward: the identity (straight-through estimator), as SQFT's ``SQFTQuantAwareLinear``
    (which writes it ``w + (fake_quantize(w) - w).detach()``, equal up to rounding)."""
    return _FakeQuantizeSTE.apply(w, scale, bits)


def on_grid(w: torch.Tensor, scale: torch.Tensor, bits: int) -> bool:
    """Whether every entry of ``w`` (out, in) equals its own fake quantization exactly."""
    return bool(torch.equal(fake_quantize(w, scale, bits).to(w.dtype), w))
