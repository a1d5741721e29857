"""Layer discovery: the stack of decoder blocks and the prunable linear maps inside it.

No attribute paths per architecture: the decoder stack is the longest ``nn.ModuleList`` of
identical blocks that contain linear maps (``model.model.layers`` for Llama, ``transformer.h``
for GPT-2, ``model.decoder.layers`` for OPT ...). Embeddings, norms and ``lm_head`` live
outside it, so they are never candidates.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2), the maps Wanda prunes."""
    return isinstance(module, LINEAR_TYPES)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as an (out_features, in_features) view, whatever the storage layout.

    ``Conv1D`` stores (in, out), so its view is the transpose; writing into the view writes
    the parameter in place.
    """
    w = module.weight.data
    return w.t() if isinstance(module, Conv1D) else w


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified_name, blocks)`` of the model's stack of decoder blocks.

    Raises:
        ValueError: when the model has no ``ModuleList`` of blocks holding linear maps.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of decoder blocks with linear layers; "
            "shears prunes decoder-only transformers"
        )
    return best


def linear_modules(block: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Qualified name -> module for every linear map inside ``block``."""
    sep = "." if prefix else ""
    return {f"{prefix}{sep}{n}": m for n, m in block.named_modules() if is_linear(m)}


def select(
    names: Iterable[str],
    targets: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
) -> list[str]:
    """Names matching any ``targets`` regex (all when None) and no ``exclude`` regex."""
    targets = [targets] if isinstance(targets, str) else targets
    exclude = [exclude] if isinstance(exclude, str) else (exclude or [])
    return [
        n
        for n in names
        if (targets is None or any(re.search(t, n) for t in targets))
        and not any(re.search(e, n) for e in exclude)
    ]


def prunable_modules(
    model: nn.Module,
    targets: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
) -> list[tuple[nn.Module, dict[str, nn.Module]]]:
    """For each decoder block, ``(block, {qualified name: linear})`` of the selected maps.

    Raises:
        ValueError: when no linear map matches, listing the candidate names.
    """
    prefix, blocks = find_decoder_blocks(model)
    per_block = []
    candidates: list[str] = []
    for i, block in enumerate(blocks):
        linears = linear_modules(block, f"{prefix}.{i}" if prefix else str(i))
        candidates += list(linears)
        keep = set(select(linears, targets, exclude))
        per_block.append((block, {n: m for n, m in linears.items() if n in keep}))
    if not any(selected for _, selected in per_block):
        shown = ", ".join(candidates[:40]) + (" ..." if len(candidates) > 40 else "")
        raise ValueError(
            f"no module matches targets={targets!r} exclude={exclude!r}; candidates: {shown}"
        )
    return per_block
