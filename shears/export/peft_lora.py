"""Export one sub-adapter as a standard PEFT LoRA adapter that stock ``peft`` loads.

A sub-adapter of rank ``r`` is the slice ``A[:r]``, ``B[:, :r]`` with the super-adapter's
scaling ``alpha / r_max``. PEFT scales a LoRA of rank ``r`` by ``lora_alpha / r``, so each
module gets ``rank_pattern = r`` and ``alpha_pattern = alpha * r / r_max`` (DESIGN.md).

PEFT 0.21 matches a ``rank_pattern`` / ``alpha_pattern`` key as the regular expression
``(.*\\.)?(key)$`` against each module name (``peft.utils.other.get_pattern_key``), first
key wins. A plain name would be a regex in which every ``.`` matches any character and
which also matches any module whose name ends with ``.<name>``; the keys are therefore
``^`` + the escaped qualified name, which matches that one module and nothing else.
``target_modules`` is the list of qualified names (PEFT: equal, or a ``.``-suffix); when a
non-target module's name ends with ``.<target>``, a full-match regex is written instead.

``peft`` itself is not imported: the files are plain JSON and safetensors. They are written
as one save (``shears.atomic.atomic_folder``): ``adapter_config.json``, which declares the
folder to PEFT, is removed first and written last, so that after a crash PEFT finds the
previous complete adapter or no ``adapter_config.json`` (its loaders then refuse the folder,
naming it), never new weights under an old config. (The config carries no digest: PEFT
warns about keys it does not know.)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from shears.adapters import elastic_modules, get_config, search_space, validate_config
from shears.adapters.index import group_of
from shears.adapters.metadata import shared_attribute
from shears.atomic import atomic_folder

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def pattern_key(name: str) -> str:
    """The ``rank_pattern`` / ``alpha_pattern`` key that PEFT matches to ``name`` only."""
    return "^" + re.escape(name)


def target_modules_field(targets: list[str], module_names: Iterable[str]) -> list[str] | str:
    """``target_modules`` selecting exactly ``targets`` among ``module_names`` under PEFT's
    rule (a list entry selects an equal name or one ending with ``.<entry>``)."""
    chosen = set(targets)
    clash = any(n not in chosen and any(n.endswith("." + t) for t in targets)
                for n in module_names)
    if not clash:
        return list(targets)
    return "(?:" + "|".join(re.escape(t) for t in targets) + ")"  # PEFT uses re.fullmatch


def _sub_adapter_ranks(model: nn.Module, config: Mapping[str, int] | None) -> dict[str, int]:
    """Module name -> rank of the sub-adapter (``config`` over the active one), validated."""
    modules = list(elastic_modules(model))
    if not modules:
        raise ValueError("the model carries no elastic LoRA adapters; nothing to export")
    sparse = [name for name, m in modules if m.sparse_adapter]
    if sparse:
        raise ValueError(
            f"{len(sparse)} adapters were built with sparse_adapter=True (e.g. {sparse[0]}): "
            "their update is (B @ A) masked by the base's zeros, which no PEFT LoRA can "
            "express. Merge them into the sparse base instead: shears.merge_adapters(model, "
            "config) keeps every zero, then model.save_pretrained(directory) (over a "
            "bitsandbytes 4-bit base, which cannot be merged: QA-SparsePEFT, "
            "docs/quantization.md).")
    active = get_config(model)
    if config is not None:
        active.update(validate_config(search_space(model), config))
    return {name: active[group_of(name, m)] for name, m in modules}


def _base_name(model: nn.Module, given: str | None) -> str | None:
    if given is not None:
        return given
    # transformers' from_pretrained sets model.name_or_path (and config.name_or_path) to its path
    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "name_or_path", None)
    return name or None


def export_peft(
    model: nn.Module,
    directory: str | os.PathLike,
    config: Mapping[str, int] | None = None,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the sub-adapter of ``config`` as a PEFT LoRA adapter; return the directory.

    ``PeftModel.from_pretrained(pruned_base, directory)`` then gives the logits of ``model``
    at ``config`` (``pruned_base`` is the model the adapters were attached to).

    Args:
        model: a model carrying elastic adapters (``add_elastic_lora``), not
            ``sparse_adapter=True`` ones (``ValueError``: merge those with
            ``merge_adapters``).
        directory: created if needed; receives ``adapter_config.json`` and
            ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight``
            (r, in) and ``.lora_B.weight`` (out, r), contiguous, in the adapter's dtype).
        config: group -> rank; ``None`` is the active configuration, a partial one takes the
            other groups from it. Validated before anything is written (``KeyError`` for an
            unknown group, ``ValueError`` for a rank outside the list); the model's active
            configuration is not changed.
        base_model_name_or_path: recorded in the config; default the model's
            ``name_or_path``.
    """
    ranks = _sub_adapter_ranks(model, config)
    modules = dict(elastic_modules(model))
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, r in ranks.items():
        m = modules[name]
        a, b = m.lora_A.detach()[:r], m.lora_B.detach()[:, :r]
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to("cpu", copy=True).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to("cpu", copy=True).contiguous()
        rank_pattern[pattern_key(name)] = r
        alpha_pattern[pattern_key(name)] = m.alpha * r / m.r_max  # scaling stays alpha/r_max
    first = next(iter(modules.values()))
    meta: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": _base_name(model, base_model_name_or_path),
        "revision": None,
        "inference_mode": True,
        # r and lora_alpha are PEFT's defaults; every module has its own entry in the patterns
        "r": max(m.r_max for m in modules.values()),
        "lora_alpha": first.alpha,
        "lora_dropout": shared_attribute(list(modules.items()), "dropout_p"),
        "target_modules": target_modules_field(list(ranks), (n for n, _ in model.named_modules())),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        # GPT-2's Conv1D stores (in, out); PEFT sets this per module anyway, with a warning
        "fan_in_fan_out": any(isinstance(m.base_layer, Conv1D) for m in modules.values()),
        "bias": "none",
        "use_rslora": False,  # rsLoRA would scale by alpha / sqrt(r)
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    out = Path(directory)
    with atomic_folder(out, declaring=[PEFT_CONFIG_NAME]) as stage:  # the config goes in last
        save_file(tensors, str(stage / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        (stage / PEFT_CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    return out
