"""quantize_base(): round-to-nearest symmetric per-group INT4 of the maps Wanda prunes.

The quantized model stays an ordinary model: every quantized map is still a plain
``nn.Linear`` / ``Conv1D`` whose weight holds the dequantized values ``q * s`` (exactly on
the grid), and the grid is recorded on the module: a buffer ``weight_scale``
(out, in // group_size) in the weight's dtype, and the ints ``quant_bits``,
``quant_group_size`` (``record.py``). So forward, ``save_pretrained``, ``Trainer``, ``to()``
work unchanged, the checkpoint holds the stock keys plus ``<map>.weight_scale`` (which plain
``from_pretrained`` skips; ``shears.load_grid`` reads it back), and the grid travels with
the live model to the adapters (QA-SparsePEFT), to ``merge_adapters`` and to
``export_compressed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from numbers import Integral

import torch
from torch import nn

from shears.pruning.layers import prunable_modules, weight_matrix

from .grid import BITS, fake_quantize, group_scales
from .record import GRID_KEY, describe_state, grid_of, record_grid, recorded_grid, set_grid

METHODS = ("rtn",)
# A 4-bit model of bitsandbytes has no fp weight to put on a grid; what to do instead.
BNB_WAY_OUT = (
    "a bitsandbytes 4-bit base stays as it is: keep the adapters unmerged and ship the "
    "sub-adapter with shears.export_peft(model, directory, config) (stock PEFT over the same "
    "4-bit base); for one INT4 model, reload the unquantized pruned checkpoint (without "
    "BitsAndBytesConfig), quantize_base it and train QA-SparsePEFT")


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
    any transformers quantizer, a checkpoint saved on a grid), or ``None``."""
    for name, m in model.named_modules():
        if type(m).__module__.startswith("bitsandbytes"):
            return f"{name} is a bitsandbytes {type(m).__name__}; {BNB_WAY_OUT}"
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        return "its config carries a quantization_config"
    if getattr(model, "hf_quantizer", None) is not None:
        return "it was loaded by a transformers quantizer"
    for name, m in model.named_modules():
        if grid_of(m) is not None or hasattr(m, "quantization_scheme"):
            return f"{name} is quantized already"
    record = recorded_grid(model)
    if record and record.get("maps"):
        name, state = next(iter(record["maps"].items()))
        return (f"its config records that {len(record['maps'])} maps were saved on a grid "
                f"({GRID_KEY}: e.g. {name} on {describe_state(state)}), and re-gridding "
                "would move every weight of a group that a merge left off max|q| = qmax. "
                "Restore the saved grid with shears.load_grid(model, checkpoint_directory); "
                f"to quantize afresh anyway, delete model.config.{GRID_KEY} first")
    for name, m in modules.items():
        if not m.weight.is_floating_point():
            return f"{name} holds a {m.weight.dtype} weight"
    return None


def _as_int(name: str, value, allowed: tuple[int, ...] | None = None) -> int:
    """``value`` as a plain int (Python or numpy ints; not bools, not floats such as 4.0)."""
    ok = isinstance(value, Integral) and not isinstance(value, bool)
    if not ok or (allowed is not None and int(value) not in allowed) or int(value) < 1:
        want = f"one of {list(allowed)}" if allowed else "a positive int"
        raise ValueError(f"{name} must be {want} (an int), got {value!r}")
    return int(value)


def _check_weights(modules: dict[str, nn.Module]) -> None:
    """Every map has data (not the meta device) and finite weights: a NaN makes its group's
    scale NaN-blind (the group's good weights round to 0), an inf turns the group into NaN.
    One ``aminmax`` per weight (as ``wanda_prune``); the count only on failure."""
    for name, m in modules.items():
        w = m.weight
        if w.is_meta:
            raise ValueError(f"{name}: the weight is on the meta device (no data); load or "
                             "materialise the weights before quantize_base")
        if not all(bool(torch.isfinite(v)) for v in torch.aminmax(w.detach())):
            bad = int((~torch.isfinite(w)).sum())
            raise ValueError(f"{name}.weight holds {bad} NaN/inf of {w.numel()} entries; its "
                             "groups cannot be quantized. Reload or repair the weights, or "
                             "leave this map out with exclude=")


def _check(model: nn.Module, modules: dict[str, nn.Module], bits, group_size,
           method: str) -> tuple[int, int]:
    """Every refusal of :func:`quantize_base`; returns ``(bits, group_size)`` as ints."""
    bits = _as_int("bits", bits, BITS)
    group_size = _as_int("group_size", group_size)
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r} (GPTQ: see "
                         "docs/quantization.md)")
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
    _check_weights(modules)
    return bits, group_size


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
    weight's dtype; the scales are recorded on the module and the grid on ``model.config``
    (``shears_grid``), so that ``save_pretrained`` keeps both (module doc of ``record.py``).
    Nothing changes before every check has passed.

    Args:
        model: a (pruned) decoder-only model without adapters.
        bits: 4 (INT4, what ``export_compressed`` packs) or 8; an int (numpy ints too).
        group_size: input columns per scale, a positive int; must divide every selected
            map's in_features.
        targets, exclude: regexes over qualified names, as in ``wanda_prune``.
        method: ``"rtn"`` (round to nearest; the only one, see docs/quantization.md).

    Returns:
        A :class:`QuantizationReport`.

    Raises:
        ValueError: adapters present; a model already quantized (by shears, bitsandbytes,
            compressed-tensors or another transformers quantizer) or reloaded from a
            checkpoint saved on a grid (restore that with ``shears.load_grid``); bits other
            than the ints 4 and 8, a group size that is not a positive int or does not
            divide a map's in_features, a method other than ``"rtn"``; a map on the meta
            device or holding NaN/inf (named).
    """
    modules = {n: m for _, block in prunable_modules(model, targets, exclude)
               for n, m in block.items()}
    bits, group_size = _check(model, modules, bits, group_size, method)
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
    record_grid(model)
    return QuantizationReport(list(modules), bits, group_size, method, zeros_before / numel,
                              zeros_after / numel, (err / norm) ** 0.5 if norm else 0.0)
