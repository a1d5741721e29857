"""Linear maps whose stored weight is packed: bitsandbytes 4-bit (NF4/FP4) ``Linear4bit``.

Its ``weight`` is a (out * in / 2, 1) uint8 tensor of codes, so anything that counts entries
or zeros of a map must read the dequantized (out, in) weight instead. Nothing here imports
bitsandbytes: a layer can only be a ``Linear4bit`` if bitsandbytes is already imported
(transformers imports it to load a 4-bit model), so it is looked up in ``sys.modules`` and
shears works without the ``quant`` extra. ``shears.quantization.bnb`` builds on these.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def is_bnb_4bit(layer: nn.Module) -> bool:
    """Whether ``layer`` is a bitsandbytes ``Linear4bit`` (NF4 or FP4)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(layer, bnb.nn.Linear4bit)


def is_cpu_packed(layer: nn.Module) -> bool:
    """Whether bitsandbytes has repacked this layer for its AVX512-BF16 CPU kernel.

    ``Linear4bit.forward`` does so, in place and for good, at the first forward in eval mode
    without grad on a CPU with AVX512-BF16: the absmax becomes bf16 and the codes are laid out
    for that kernel, so the stored weight no longer dequantizes with ``dequantize_4bit``.
    """
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def dequantize_4bit(layer: nn.Module, name: str) -> torch.Tensor:
    """The (out, in) weight of a bitsandbytes ``Linear4bit``, dequantized, in the dtype the
    layer was quantized from; a new tensor. ``ValueError`` naming ``name`` for a layer not
    quantized yet or repacked for CPU inference (its codes are in another layout)."""
    state = getattr(layer.weight, "quant_state", None)
    if state is None:
        raise ValueError(f"{name}: this Linear4bit is not quantized yet (no quant_state); "
                         "load the model with a BitsAndBytesConfig or move it to its device")
    if is_cpu_packed(layer):
        raise ValueError(
            f"{name}: bitsandbytes repacked this 4-bit layer for CPU inference (a forward in "
            "eval mode without grad on an AVX512-BF16 CPU), whose codes do not dequantize; "
            "reload the 4-bit model and read it before any such forward")
    return sys.modules["bitsandbytes"].functional.dequantize_4bit(layer.weight.data, state)
