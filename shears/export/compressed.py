"""export_compressed(): a model on its INT4 grid as a compressed-tensors ``pack-quantized``
checkpoint (W4A16, symmetric, group strategy), the format llmcompressor writes and that
transformers (with compressed-tensors installed) and vLLM load.

The packing is compressed-tensors' own ``PackedQuantizationCompressor`` fed with the scales
``quantize_base`` recorded; the config is its ``QuantizationConfig``, written into
``config.json`` by its ``ModelCompressor``. The live model is not changed: the packed tensors
replace the quantized maps' weights only in the state dict handed to ``save_pretrained``.

``config.json`` declares the format (its ``quantization_config`` tells transformers and vLLM
to read ``weight_packed``): it is written once, complete, last. ``save_pretrained`` and the
config update write into a staging folder, and ``shears.atomic.atomic_folder`` moves the files
in with the old ``config.json`` removed first. After a crash the folder holds the previous
complete checkpoint, or weights without ``config.json``, which ``from_pretrained`` refuses
(``OSError`` naming the folder and ``config.json``); never packed weights under a config
without ``quantization_config`` (transformers would load the maps as random dense weights).
The ``save_pretrained`` weight files of an earlier save that this one does not overwrite
(``model.safetensors``, shards, index) are removed, so that no stale index sends a loader
to shards that are gone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

from shears.atomic import atomic_folder
from shears.quantization import check_scales, grid_of, quantized_modules, require
from shears.quantization.bnb import is_bnb_4bit
from shears.quantization.grid import on_grid
from shears.quantization.quantize import BNB_WAY_OUT

from .checkpoint import HF_CONFIG_NAME
from .integrity import hf_weight_file


@dataclass
class CompressedExport:
    """What ``export_compressed`` wrote.

    Attributes:
        directory: the checkpoint folder.
        layers: qualified names of the packed maps.
        bits, group_size: their grid.
        packed_bytes: bytes of those maps as stored (packed ints, scales, shapes).
        bf16_bytes: bytes the same maps take as bf16 weights (2 per entry).
    """

    directory: str
    layers: list[str]
    bits: int
    group_size: int
    packed_bytes: int
    bf16_bytes: int


def _refuse_other_quantization(model: nn.Module) -> None:
    """A model quantized by another library (bitsandbytes NF4, a transformers quantizer) has
    no grid of ``quantize_base`` and cannot get one (``quantize_base`` refuses it): name the
    way out that works for it instead of "quantize it first"."""
    bnb = next((n for n, m in model.named_modules() if is_bnb_4bit(m)), None)
    if bnb is not None:
        raise ValueError(f"the model's maps are bitsandbytes 4-bit (e.g. {bnb}), which "
                         "compressed-tensors' INT4 checkpoint cannot hold and quantize_base "
                         f"cannot re-grid: {BNB_WAY_OUT}")
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError("the model was loaded by a transformers quantizer; save it with "
                         "model.save_pretrained (export_compressed writes models on the grid "
                         "of shears.quantize_base)")


def _check(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized maps, after every refusal (nothing is written before)."""
    _refuse_other_quantization(model)
    carrier = next((n for n, m in model.named_modules() if hasattr(m, "lora_A")), None)
    if carrier is not None:
        raise ValueError(f"the model still carries adapters ({carrier or 'the model'}); merge "
                         "them first: shears.merge_adapters(model, config)")
    maps = quantized_modules(model)
    if not maps:
        raise ValueError("the model is not on an integer grid; quantize it first: "
                         "shears.quantize_base(model, bits=4, group_size=...)")
    for name, m in maps.items():
        if type(m) is not nn.Linear:
            raise ValueError(f"{name} is a {type(m).__name__}; compressed-tensors packs "
                             "nn.Linear maps only")
        check_scales(name, m)  # a NaN scale is named as such, not as "off its grid"
        grid = grid_of(m)
        if not on_grid(m.weight.data, grid.scale, grid.bits):
            raise ValueError(f"{name}: its weight is no longer on its grid (changed after "
                             "quantize_base?)")
    settings = {(grid_of(m).bits, grid_of(m).group_size) for m in maps.values()}
    if len(settings) > 1:
        raise ValueError(f"the maps use several grids {sorted(settings)}; export_compressed "
                         "writes one (bits, group_size)")
    return maps


def export_compressed(model: nn.Module, directory: str | os.PathLike,
                      **save_kwargs) -> CompressedExport:
    """Write ``model`` (merged, on its grid) as a compressed-tensors ``pack-quantized``
    checkpoint that ``AutoModelForCausalLM.from_pretrained(directory)`` loads.

    Every map quantized by ``quantize_base`` is stored as ``weight_packed`` (int32, 8 INT4
    values each), ``weight_scale`` (out, in // group_size) and ``weight_shape``; every other
    tensor as ``save_pretrained`` writes it. ``config.json`` gains the
    ``quantization_config`` (targets ``Linear``, every other ``nn.Linear`` such as
    ``lm_head`` in ``ignore``).

    Args:
        model: a model quantized by ``quantize_base`` (then adapted with QA-SparsePEFT and
            merged, or not), without adapters.
        directory: where to write; the ``save_pretrained`` weight files already there are
            replaced (stale shards and index removed), other files are kept.
        save_kwargs: passed to ``model.save_pretrained`` (which writes into a staging
            folder inside ``directory``).

    Raises:
        ValueError: a bitsandbytes 4-bit model (the message names ``export_peft``, its way
            out), adapters still present (use ``merge_adapters``), no grid (use
            ``quantize_base``), a map whose recorded scales are NaN/inf or not positive, a
            map off its grid, a ``Conv1D`` map, mixed grids.
        ImportError: compressed-tensors missing (the ``quant`` extra).
    """
    maps = _check(model)
    require("compressed_tensors")
    from compressed_tensors.compressors.model_compressors.model_compressor import (
        ModelCompressor,
    )
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    first = grid_of(next(iter(maps.values())))
    bits, group_size = first.bits, first.group_size
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group",
                            group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = model.state_dict()
    packed_bytes = bf16_bytes = 0
    for name, m in maps.items():
        packed = PackedQuantizationCompressor.compress(
            {"weight": m.weight.data, "weight_scale": grid_of(m).scale}, scheme)
        del state[f"{name}.weight"]
        for key, tensor in packed.items():
            state[f"{name}.{key}"] = tensor.contiguous()
            packed_bytes += tensor.numel() * tensor.element_size()
        bf16_bytes += m.weight.numel() * 2
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in maps]
    config = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                quantization_status="compressed", ignore=ignore)
    directory = os.fspath(directory)
    stale = hf_weight_file(save_kwargs.get("variant"))
    with atomic_folder(directory, declaring=[HF_CONFIG_NAME], stale=stale,
                       placeholder=True) as stage:
        model.save_pretrained(stage, state_dict=state, **save_kwargs)
        ModelCompressor(quantization_config=config).update_config(os.fspath(stage))
    return CompressedExport(directory, list(maps), bits, group_size, packed_bytes, bf16_bytes)


__all__ = ["CompressedExport", "export_compressed"]
