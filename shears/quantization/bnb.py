"""bitsandbytes 4-bit bases (QLoRA-style NLS): recognise a ``Linear4bit`` and read its weight.

Nothing here imports bitsandbytes at module import: a layer can only be a ``Linear4bit`` if
bitsandbytes is already imported (transformers imports it to load a 4-bit model), so
``is_bnb_4bit`` looks it up in ``sys.modules`` and shears works without the ``quant`` extra.
``is_bnb_4bit``, ``is_cpu_packed`` and the dequantization live in ``shears.pruning.packed``
(the sparsity report, in ``pruning``, reads 4-bit maps too) and are re-exported here.

NF4 has an exact zero (code 7 of the 16), so a pruned weight quantized to NF4 keeps every
zero: ``dequantized_weight`` returns 0.0 exactly wherever the fp weight was 0 (and also where
a small non-zero weight rounds to the zero code).
"""

from __future__ import annotations

import torch
from torch import nn

from shears.pruning.packed import dequantize_4bit, is_bnb_4bit, is_cpu_packed

from .optional import require

__all__ = ["check_bnb_layer", "dequantized_weight", "is_bnb_4bit", "is_cpu_packed",
           "keep_trainable_layout"]


def keep_trainable_layout(layer: nn.Module) -> None:
    """Stop bitsandbytes from repacking ``layer`` for CPU inference (see ``is_cpu_packed``),
    so that its weight stays in the layout that backward and ``dequantized_weight`` read.
    CPU inference then takes bitsandbytes' generic dequantize-and-matmul path."""
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False


def check_bnb_layer(layer: nn.Module, name: str) -> None:
    """``ValueError`` naming ``name`` if a 4-bit layer cannot carry a trainable adapter."""
    if is_cpu_packed(layer):
        raise ValueError(
            f"{name}: bitsandbytes repacked this 4-bit layer for CPU inference (a forward in "
            "eval mode without grad on an AVX512-BF16 CPU), which has no backward and a bf16 "
            "absmax; reload the 4-bit model and attach the adapters before any such forward")
    if getattr(layer.weight, "quant_state", None) is None:
        raise ValueError(f"{name}: this Linear4bit is not quantized yet (no quant_state); "
                         "load the model with a BitsAndBytesConfig or move it to its device")


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a bitsandbytes ``Linear4bit``, dequantized, in the dtype the
    layer was quantized from (``quant_state.dtype``); a new tensor, not a view."""
    if is_cpu_packed(layer):
        check_bnb_layer(layer, type(layer).__name__)
    require("bitsandbytes")
    return dequantize_4bit(layer, type(layer).__name__)
