"""load_grid(): give a model reloaded with plain ``from_pretrained`` the grid it was saved on.

``quantize_base`` records the grid on every map (a persistent ``weight_scale`` buffer) and on
``model.config`` (``shears_grid``: which maps, bits, group size), so a ``save_pretrained``
directory (or a ``Trainer`` checkpoint) holds ``<map>.weight_scale`` beside each weight and
the record in ``config.json``. Plain ``from_pretrained`` skips the scales (the weights reload
bit-identical); ``load_grid`` reads them back, checks that every weight is still exactly on
its saved grid, and records the grid again, so that QA-SparsePEFT adapters, ``merge_adapters``
and ``export_compressed`` see the model as it was saved. Only the scales are read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from shears.adapters import ElasticLoRALinear
from shears.pruning.layers import weight_matrix
from shears.quantization import quantized_modules
from shears.quantization.bnb import is_bnb_4bit
from shears.quantization.grid import BITS, on_grid
from shears.quantization.record import (
    GRID_FORMAT,
    GRID_KEY,
    GRID_VERSION,
    SCALE,
    Grid,
    record_grid,
    scale_problem,
    set_grid,
)

from .checkpoint import HF_CONFIG_NAME, _read, _weight_files
from .layout import prefixes_to


def _record(directory: Path) -> dict:
    """The ``shears_grid`` entry of ``directory/config.json``; ``ValueError`` if there is none."""
    path = directory / HF_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {HF_CONFIG_NAME} in {directory}; load_grid reads a "
                                "save_pretrained directory or a Trainer checkpoint")
    config = json.loads(path.read_text())
    if config.get("quantization_config") is not None:
        raise ValueError(f"{directory} is a quantized checkpoint (quantization_config, e.g. "
                         "export_compressed): transformers restores its own quantization")
    record = config.get(GRID_KEY)
    if not record or not record.get("maps"):
        raise ValueError(f"{path} records no grid ({GRID_KEY}): the model was saved without "
                         "quantize_base's grid (or by a shears that did not save grids); for "
                         "an unquantized base, quantize it: shears.quantize_base(model, ...)")
    if record.get("format") != GRID_FORMAT or record.get("version") != GRID_VERSION:
        raise ValueError(f"{path}: {GRID_KEY} is not a version-{GRID_VERSION} {GRID_FORMAT}")
    return record


def _one_prefix(names: set[str], saved: list[str]) -> tuple[str, str]:
    """The one ``(old, new)`` prefix pair mapping every saved map name into the model's."""
    pairs = prefixes_to(names, saved)
    if ("", "") in pairs:
        return "", ""
    if len(pairs) != 1:
        lacking = next((n for n in saved if n not in names), saved[0])
        found = f"several prefixes fit: {pairs}" if pairs else "no prefix maps them onto it"
        raise ValueError(f"the model has no {lacking} for the saved grid ({found})")
    return pairs[0]


def _scale_keys(directory: Path, files: dict, saved: list[str]) -> dict[str, str]:
    """Saved map name -> the key of its scale in the weight files (the state dict may name
    maps with one prefix more or less than the record, e.g. quantize_base(model.model))."""
    keys = {n: f"{n}.{SCALE}" for n in saved}
    stems = {k[: -len(SCALE) - 1] for k in files if k.endswith("." + SCALE)}
    if not all(k in files for k in keys.values()) and stems:
        pairs = prefixes_to(stems, saved)
        if len(pairs) == 1:
            old, new = pairs[0]
            keys = {n: f"{new}{n[len(old):]}.{SCALE}" for n in saved}
    absent = [k for k in keys.values() if k not in files]
    if absent:
        raise ValueError(f"{directory}: the grid recorded in {HF_CONFIG_NAME} has no scales "
                         f"in the weight files: {absent[:3]} missing ({len(absent)} of "
                         f"{len(keys)}); the checkpoint was written without them")
    return keys


def _map(model: nn.Module, name: str) -> nn.Module:
    """The plain map at ``name``; an adapter's base layer when the model carries adapters."""
    module = model.get_submodule(name)
    return module.base_layer if isinstance(module, ElasticLoRALinear) else module


def load_grid(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Record on ``model`` the grid saved with it in ``directory`` and return the model.

    ``directory`` is the ``save_pretrained`` directory (or ``Trainer`` checkpoint) ``model``
    was loaded from: ``config.json`` names the maps and their bits and group size
    (``shears_grid``), and the weight files hold each map's ``<map>.weight_scale``
    (out, in // group_size). Saved names are matched to the model by one prefix, as in
    ``load_adapter``; a model carrying adapters gets the grid on their base layers.

    Checked before anything changes, each with a ``ValueError`` naming the map: the record
    and every scale are there, with the saved shape and finite positive values; the weight
    has the dtype the grid was saved for (reload with that ``dtype``); the weight is exactly
    on its saved grid (else it changed since saving). The model must carry no grid yet.
    """
    directory = Path(directory)
    record = _record(directory)
    if quantized_modules(model):
        raise ValueError("the model already carries a grid; load_grid restores one onto a "
                         "model reloaded without it")
    saved = list(record["maps"])
    files = _weight_files(directory)
    keys = _scale_keys(directory, files, saved)
    old, new = _one_prefix({n for n, _ in model.named_modules()}, saved)
    tensors = _read(files, list(keys.values()))
    plan = []
    for name, (bits, group_size) in record["maps"].items():
        target = f"{new}{name[len(old):]}"
        module = _map(model, target)
        plan.append((module, _checked_scale(target, module, tensors[keys[name]], bits,
                                            group_size), bits, group_size))
    for module, scale, bits, group_size in plan:  # every check has passed
        set_grid(module, scale, bits, group_size)
    record_grid(model)
    return model


def _checked_scale(name: str, module: nn.Module, scale, bits: int, group_size: int):
    """The saved scale of one map, on the weight's device, after every check."""
    if is_bnb_4bit(module) or not hasattr(module, "weight"):
        raise ValueError(f"{name} is not a plain linear map ({type(module).__name__})")
    w = weight_matrix(module)
    if bits not in BITS or group_size < 1 or w.shape[1] % group_size:
        raise ValueError(f"{name}: saved grid bits={bits}, group_size={group_size} does not fit "
                         f"its weight {tuple(w.shape)}")
    if tuple(scale.shape) != (w.shape[0], w.shape[1] // group_size):
        raise ValueError(f"{name}: saved scale {tuple(scale.shape)} does not fit its weight "
                         f"{tuple(w.shape)} at group size {group_size}")
    if scale.dtype != w.dtype:
        raise ValueError(f"{name}: the weight is {w.dtype} but the grid was saved for "
                         f"{scale.dtype} weights (a cast leaves the grid); reload with "
                         f"from_pretrained(..., dtype={scale.dtype})")
    problem = scale_problem(Grid(scale, bits, group_size))
    if problem:
        raise ValueError(f"{name}: the saved grid is broken: {problem}")
    scale = scale.to(w.device)
    if not on_grid(w.detach(), scale, bits):
        raise ValueError(f"{name}: its weight is not on the saved grid (changed since "
                         "saving?); nothing was restored")
    return scale


__all__ = ["load_grid"]
