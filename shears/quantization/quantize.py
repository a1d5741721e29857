"""quantize_base(): round-to-nearest symmetric per-group INT4 of the maps Wanda prunes.

The quantized model stays an ordinary model: every quantized map is still a plain
``nn.Linear`` / ``Conv1D`` whose weight holds the dequantized values ``q * s`` (exactly on
the grid), and the grid is recorded on the module: a non-persistent buffer ``weight_scale``
(out, in // group_size) in the weight's dtype, and the ints ``quant_bits``,
``quant_group_size``. So forward, ``save_pretrained``, ``Trainer``, ``to()`` work unchanged,
the checkpoint keeps the stock key set, and the grid travels with the live model to the
adapters (QA-SparsePEFT), to ``merge_adapters`` and to ``export_compressed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from shears.pruning.layers import prunable_modules, weight_matrix

from .grid import fake_quantize, group_scales, int_range

SCALE = "weight_scale"
BITS_ATTR = "quant_bits"
GROUP_ATTR = "quant_group_size"
METHODS = ("rtn",)


@dataclass(frozen=True)
class Grid:
    """The grid of one quantized map: scales (out, in // group_size), bits, group size."""

    scale: torch.Tensor
    bits: int
    group_size: int


def grid_of(module: nn.Module) -> Grid | None:
    """The :class:`Grid` recorded by :func:`quantize_base` on ``module``, else ``None``."""
    bits = getattr(module, BITS_ATTR, None)
    scale = getattr(module, SCALE, None)
    if bits is None or not isinstance(scale, torch.Tensor):
        return None
    return Grid(scale, bits, getattr(module, GROUP_ATTR))


def set_grid(module: nn.Module, scale: torch.Tensor, bits: int, group_size: int) -> None:
    """Record the grid on a plain linear map (the buffer is not saved in state dicts)."""
    module.register_buffer(SCALE, scale, persistent=False)
    setattr(module, BITS_ATTR, bits)
    setattr(module, GROUP_ATTR, group_size)


def clear_grid(module: nn.Module) -> None:
    """Forget the grid of ``module`` (its weights are left as they are)."""
    if SCALE in module._buffers:
        del module._buffers[SCALE]
    module.__dict__.pop(BITS_ATTR, None)
    module.__dict__.pop(GROUP_ATTR, None)


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module for every map carrying a grid of :func:`quantize_base`."""
    return {n: m for n, m in model.named_modules() if grid_of(m) is not None}


@dataclass
class QuantizationReport:
    """What :func:`quantize_base` did.

    Attributes:
        layers: qualified names of the quantized maps.
        bits, group_size, method: the grid.
        sparsity_before, sparsity_after: zeros over entries of those maps (equal: 0 -> 0).
        relative_error: ``||W - Q(W)||_F / ||W||_F`` over those maps together.
    """

    layers: list[str]
    bits: int
    group_size: int
    method: str
    sparsity_before: float
    sparsity_after: float
    relative_error: float

    def to_dict(self) -> dict:
        return asdict(self)


def _already_quantized(model: nn.Module, modules: dict[str, nn.Module]) -> str | None:
    """Why the model counts as quantized already (shears, bitsandbytes, compressed-tensors,
    any transformers quantizer), or ``None``."""
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        return "its config carries a quantization_config"
    if getattr(model, "hf_quantizer", None) is not None:
        return "it was loaded by a transformers quantizer"
    for name, m in model.named_modules():
        if grid_of(m) is not None or hasattr(m, "quantization_scheme"):
            return f"{name} is quantized already"
        if type(m).__module__.startswith("bitsandbytes"):
            return f"{name} is a bitsandbytes {type(m).__name__}"
    for name, m in modules.items():
        if not m.weight.is_floating_point():
            return f"{name} holds a {m.weight.dtype} weight"
    return None


def _check(model: nn.Module, modules: dict[str, nn.Module], bits: int, group_size: int,
           method: str) -> None:
    int_range(bits)  # ValueError for unsupported bits
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r} (GPTQ: see "
                         "docs/quantization.md)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    carrier = next((n for n, m in model.named_modules() if hasattr(m, "lora_A")), None)
    if carrier is not None:
        raise ValueError(f"the model carries adapters ({carrier or 'the model'}); quantize the "
                         "base before add_elastic_lora, or merge_adapters first")
    reason = _already_quantized(model, modules)
    if reason is not None:
        raise ValueError(f"the model is already quantized: {reason}")
    for name, m in modules.items():
        in_features = weight_matrix(m).shape[1]
        if in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features="
                             f"{in_features} of {name}")


@torch.no_grad()
def quantize_base(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 128,
    *,
    targets: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    method: str = "rtn",
) -> QuantizationReport:
    """Quantize the decoder's linear maps in place: symmetric, per group of ``group_size``
    input columns, round to nearest; every zero stays an exact zero.

    Each map's weight (out, in) becomes ``q * s`` with ``q`` in ``[-8, 7]`` (4 bits) or
    ``[-128, 127]`` (8 bits) and ``s = max|W_group| / 7`` (or ``/ 127``), written in the
    weight's dtype; the scales are recorded on the module (module doc). Nothing changes
    before every check has passed.

    Args:
        model: a (pruned) decoder-only model without adapters.
        bits: 4 (INT4, what ``export_compressed`` packs) or 8.
        group_size: input columns per scale; must divide every selected map's in_features.
        targets, exclude: regexes over qualified names, as in ``wanda_prune``.
        method: ``"rtn"`` (round to nearest; the only one, see docs/quantization.md).

    Returns:
        A :class:`QuantizationReport`.

    Raises:
        ValueError: adapters present, a model already quantized, unsupported bits or
            method, a group size that does not divide a map's in_features (named).
    """
    modules = {n: m for _, block in prunable_modules(model, targets, exclude)
               for n, m in block.items()}
    _check(model, modules, bits, group_size, method)
    zeros_before = zeros_after = numel = 0
    err = norm = 0.0
    for m in modules.values():
        w = weight_matrix(m)  # (out, in) view: writing it writes the parameter
        scale = group_scales(w, bits, group_size)
        wq = fake_quantize(w, scale, bits)
        zeros_before += int((w == 0).sum())
        err += float((w.float() - wq.float()).square().sum())
        norm += float(w.float().square().sum())
        w.copy_(wq)
        zeros_after += int((w == 0).sum())
        numel += w.numel()
        set_grid(m, scale, bits, group_size)
    return QuantizationReport(list(modules), bits, group_size, method, zeros_before / numel,
                              zeros_after / numel, (err / norm) ** 0.5 if norm else 0.0)
