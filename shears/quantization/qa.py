"""QA-SparsePEFT (SQFT's ``SQFTQuantAwareLinear``): a sparse adapter trained on the grid of
its quantized base, so that the trained function is the one a merge ships.

The effective weight is ``Q(W + delta * (W != 0))``: the update, masked by the base's
non-zeros, added to the (already on-grid) base and rounded to the nearest point of the
base's own grid (its scales, fixed). Zeros of ``W`` get no update and round to 0, so the
merged weight keeps every zero. Gradients pass through the rounding unchanged
(straight-through estimator), to the adapter's ``A`` and ``B`` through ``delta``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .grid import fake_quantize_ste
from .record import Grid


def qa_weight(w: torch.Tensor, delta: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(out, in) fp32 ``Q(W + delta * (W != 0))`` on ``grid``, straight-through gradient to
    ``delta``. ``w``: the base weight (out, in), on the grid; ``delta``: (out, in) fp32."""
    merged = w.float() + delta * (w != 0)
    return fake_quantize_ste(merged, grid.scale, grid.bits)


def qa_linear(x: torch.Tensor, base_layer: nn.Module, w: torch.Tensor, delta: torch.Tensor,
              grid: Grid) -> torch.Tensor:
    """x: (..., in) in the adapters' dtype -> (..., out) in ``w.dtype``:
    ``x @ qa_weight(w, delta).T + bias`` (SQFT applies the adapter's dropout to ``x`` for the
    whole product).

    The product runs in ``x``'s dtype: fp32 for fp32 adapters (the default, whatever the
    base), or the dtype of a later ``model.to(torch.bfloat16)``, which casts the adapters
    with the base, as the other adapters' update follows it. The grid point itself is exact
    in the base's dtype (its scales are), so casting it to ``x``'s loses nothing there.
    """
    wq = qa_weight(w, delta, grid).to(x.dtype)
    bias = getattr(base_layer, "bias", None)
    out = F.linear(x, wq, None if bias is None else bias.to(x.dtype))
    return out.to(w.dtype)


@torch.no_grad()
def qa_merged_weight(w: torch.Tensor, delta: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The weight ``merge_adapters`` writes: the QA forward's weight, in ``w.dtype``."""
    return qa_weight(w, delta, grid).to(w.dtype)
