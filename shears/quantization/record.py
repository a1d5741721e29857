"""The grid as recorded: on each quantized map, and on ``model.config`` for ``config.json``.

On a map (``quantize_base`` records it): the buffer ``weight_scale`` (out, in // group_size)
in the weight's dtype, persistent, so that ``save_pretrained`` writes the scales beside the
weights (``<map>.weight_scale``; plain ``from_pretrained`` skips them), and the ints
``quant_bits``, ``quant_group_size``.

On the config (``shears_grid``), so that a checkpoint says which of its maps hold weights on
an integer grid, and of which bits and group size: ``quantize_base`` (and
``shears.load_grid``) put a live entry there. Each time the config is serialised
(``save_pretrained``, every ``Trainer`` checkpoint) it describes the grids the model
carries at that moment (``{"format", "version", "maps": {name: [bits, group_size]}}``, or
``None`` once no map carries one, e.g. after a dense merge). Plain ``from_pretrained`` skips
the scales, so the weights reload bit-identical without shears.

A model reloaded without its grid keeps the entry as a plain dict: ``quantize_base`` then
refuses to re-grid it (a merge moves groups off ``max|q| = qmax``, where a fresh
round-to-nearest would pick other scales and move weights), and ``load_grid`` restores it.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

SCALE = "weight_scale"
BITS_ATTR = "quant_bits"
GROUP_ATTR = "quant_group_size"
GRID_KEY = "shears_grid"
GRID_FORMAT = "shears-grid"
GRID_VERSION = 1


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
    """Record the grid on a plain linear map. The scale buffer is persistent: state dicts
    (``save_pretrained``, ``Trainer`` checkpoints) carry it as ``<map>.weight_scale``."""
    module.register_buffer(SCALE, scale, persistent=True)
    setattr(module, BITS_ATTR, int(bits))
    setattr(module, GROUP_ATTR, int(group_size))


def clear_grid(module: nn.Module) -> None:
    """Forget the grid of ``module`` and of every module inside it (weights are left as
    they are): ``clear_grid(model)`` before a plain ``save_pretrained`` whose consumer must
    not see the scales (vLLM refuses tensors it does not know)."""
    for m in module.modules():
        if grid_of(m) is None:
            continue
        del m._buffers[SCALE]
        m._non_persistent_buffers_set.discard(SCALE)
        m.__dict__.pop(BITS_ATTR, None)
        m.__dict__.pop(GROUP_ATTR, None)


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module for every map carrying a grid of :func:`quantize_base`."""
    return {n: m for n, m in model.named_modules() if grid_of(m) is not None}


def scale_problem(grid: Grid) -> str | None:
    """What is wrong with a recorded grid's scales, in words, or ``None``: a NaN/inf scale
    rounds every weight of its group to NaN, a zero (an fp16 cast underflows tiny scales)
    or negative one divides by zero or flips the grid. One reduction (``aminmax``)."""
    lo, hi = torch.aminmax(grid.scale.detach().float())
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        bad = int((~torch.isfinite(grid.scale)).sum())
        return f"{bad} of its {grid.scale.numel()} scales are NaN/inf"
    if float(lo) <= 0:
        bad = int((grid.scale <= 0).sum())
        return f"{bad} of its {grid.scale.numel()} scales are <= 0 (smallest {float(lo):.3g})"
    return None


def check_scales(name: str, module: nn.Module) -> None:
    """``ValueError`` naming ``name`` if the grid recorded on ``module`` has bad scales."""
    grid = grid_of(module)
    problem = None if grid is None or grid.scale.is_meta else scale_problem(grid)
    if problem:
        raise ValueError(f"{name}: the recorded grid is broken: {problem} (NaN/inf weights, a "
                         "cast that underflowed, or a scale edited by hand); re-quantize the "
                         "unquantized base with shears.quantize_base")


def grid_state(module: nn.Module) -> list[int] | None:
    """``[bits, group_size]`` of the grid recorded on ``module``, or ``None`` (no grid)."""
    grid = grid_of(module)
    return None if grid is None else [int(grid.bits), int(grid.group_size)]


def describe_state(state: list[int] | None) -> str:
    """A grid state in words: ``"an INT4 grid, group size 32"`` or ``"no grid"``."""
    if state is None:
        return "no grid (not quantized by quantize_base)"
    bits, group_size = state
    return f"an INT{bits} grid, group size {group_size}"


def _saved_name(model: nn.Module, name: str) -> str:
    """The state-dict name of a gridded map: an adapter's base layer is saved under the
    adapter's own name (``...q_proj.base_layer`` -> ``...q_proj``, see adapters/layer.py)."""
    parent, _, child = name.rpartition(".")
    if child == "base_layer" and hasattr(model.get_submodule(parent), "lora_A"):
        return parent
    return name


def grid_record(model: nn.Module) -> dict[str, Any] | None:
    """The grids ``model`` carries now, keyed by state-dict name, or ``None`` if none."""
    maps = {_saved_name(model, n): grid_state(m) for n, m in model.named_modules()
            if grid_of(m) is not None}
    if not maps:
        return None
    return {"format": GRID_FORMAT, "version": GRID_VERSION, "maps": maps}


class _LiveGrid(dict):
    """The entry on ``model.config``: its copies (``config.to_dict`` deep-copies, pickling)
    are the model's :func:`grid_record` at that moment; ``None`` once the model is gone."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(grid_record(model) or {})
        self._model = weakref.ref(model)

    def snapshot(self) -> dict[str, Any] | None:
        model = self._model()
        if model is None:  # the model is gone: what was recorded last
            return copy.deepcopy(dict(self)) or None
        return grid_record(model)

    def __deepcopy__(self, memo: dict) -> dict[str, Any] | None:
        return self.snapshot()

    def __reduce__(self):
        return copy.copy, (self.snapshot(),)


def _config_of(model: nn.Module) -> PretrainedConfig | None:
    config = getattr(model, "config", None)
    return config if isinstance(config, PretrainedConfig) else None


def record_grid(model: nn.Module) -> bool:
    """Put the live grid entry on ``model.config``; False if it has no transformers config."""
    config = _config_of(model)
    if config is None:
        return False
    setattr(config, GRID_KEY, _LiveGrid(model))
    return True


def refresh_grid_record(model: nn.Module) -> None:
    """Make an entry on ``model.config`` live again (a deep copy of the model holds a plain
    one), after something changed the grids, e.g. a merge that forgot some."""
    if getattr(_config_of(model), GRID_KEY, None) is not None:
        record_grid(model)


def recorded_grid(model: nn.Module) -> dict[str, Any] | None:
    """The grid entry of ``model.config`` as a plain dict (a live one's snapshot), or None."""
    entry = getattr(_config_of(model), GRID_KEY, None)
    if isinstance(entry, _LiveGrid):
        return entry.snapshot()
    return entry or None
