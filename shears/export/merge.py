"""Merge one sub-adapter into the sparse base: plain layers again, every zero of the base kept.

After ``merge_adapters`` the model holds no shears module, so ``model.save_pretrained(d)``
writes an ordinary checkpoint that ``AutoModelForCausalLM.from_pretrained(d)`` loads.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from shears.adapters import (
    ElasticLoRALinear,
    clear_adapter_metadata,
    elastic_modules,
    set_config,
)
from shears.adapters.inject import REQUIRES_GRAD_ATTR
from shears.quantization.bnb import is_bnb_4bit

PROBE_SEED = 0


@dataclass
class _Merged:
    """What one merged map lost or kept, for the warnings."""

    name: str
    zeros_before: int
    zeros_after: int
    numel: int
    dropped: float = 0.0  # ||X (delta outside the mask)^T|| on the probe
    output: float = 0.0  # ||X (W + delta)^T|| on the probe
    update: float = 0.0  # ||X delta^T|| on the probe


def probe_input(in_features: int, tokens: int) -> torch.Tensor:
    """The probe of one map: (tokens, in_features) standard normal, generator seeded
    ``PROBE_SEED`` afresh for every map (so a test can rebuild it)."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randn(tokens, in_features, generator=g)


@torch.no_grad()
def _merge_one(name: str, m: ElasticLoRALinear, keep_sparsity: bool, probe_tokens: int):
    """Write base + delta of the active sub-adapter into ``m.base_layer`` in place."""
    w = m.base_weight()  # (out, in) view of the base parameter (transposed for Conv1D)
    delta = m.delta_weight()  # fp32 (out, in); already masked for sparse_adapter=True
    keep = w != 0
    info = _Merged(name, int((~keep).sum()), 0, w.numel())
    if keep_sparsity and not m.sparse_adapter:
        dropped = delta * ~keep
        if dropped.any():
            x = probe_input(m.in_features, probe_tokens).to(delta.device)
            info.dropped = float((x @ dropped.T).norm())
            info.output = float((x @ (w.float() + delta).T).norm())
            info.update = float((x @ delta.T).norm())
        delta = delta * keep
    merged = (w.float() + delta).to(w.dtype)
    w.copy_(merged)
    info.zeros_after = int((merged == 0).sum())
    return info


def _refuse_4bit_base(modules: list[tuple[str, ElasticLoRALinear]]) -> None:
    """A bitsandbytes 4-bit base has no fp weight to write base + delta into: re-quantizing
    the sum to NF4 would lose most of the update. Refuse before anything changes."""
    quantized = [name for name, m in modules if is_bnb_4bit(m.base_layer)]
    if quantized:
        raise ValueError(
            f"{len(quantized)} adapters sit on a bitsandbytes 4-bit base (e.g. {quantized[0]}),"
            " which cannot be merged: re-quantizing base + update to NF4 would lose most of the"
            " update. Keep the adapters unmerged and export them with shears.export_peft (stock"
            " PEFT loads them over the same 4-bit base), or, for one merged sparse INT4 model,"
            " train over shears.quantize_base(model) with sparse_adapter=True (QA-SparsePEFT,"
            " docs/quantization.md) and merge that.")


def _restore_requires_grad(model: nn.Module) -> None:
    """Give every parameter back the requires_grad recorded by add_elastic_lora."""
    for owner in model.modules():
        recorded = owner.__dict__.pop(REQUIRES_GRAD_ATTR, None)
        if recorded is None:
            continue
        for name, p in owner.named_parameters():
            if name in recorded:
                p.requires_grad_(recorded[name])


def _warn(merged: list[_Merged], keep_sparsity: bool, probe_tokens: int) -> None:
    if keep_sparsity:
        masked = [i for i in merged if i.dropped > 0]
        if masked:
            rel = [i.dropped / i.output for i in masked]
            lost = [i.dropped / i.update for i in masked]
            worst = max(range(len(rel)), key=rel.__getitem__)
            warnings.warn(
                f"merge_adapters(keep_sparsity=True): {len(masked)} of {len(merged)} adapters "
                "were not trained with sparse_adapter=True, so their update was masked by the "
                "base's zeros and the merged model differs from the adapted one. On a Gaussian "
                f"probe ({probe_tokens} tokens), relative change of the merged layers' outputs:"
                f" mean {sum(rel) / len(rel):.4%}, max {rel[worst]:.4%} ({masked[worst].name});"
                f" share of the adapters' update removed: mean {sum(lost) / len(lost):.4%}, "
                f"max {max(lost):.4%}. Train with sparse_adapter=True for an exact sparse "
                "merge, or keep the adapters unmerged.", UserWarning, stacklevel=3)
        return
    before = sum(i.zeros_before for i in merged)
    after = sum(i.zeros_after for i in merged)
    if after < before:
        numel = sum(i.numel for i in merged)
        warnings.warn(
            f"merge_adapters(keep_sparsity=False): the sparsity of the {len(merged)} merged "
            f"maps went from {before / numel:.4%} to {after / numel:.4%} ({before} -> {after} "
            f"zeros of {numel}); the base is no longer sparse. Pass keep_sparsity=True to keep "
            "every zero.", UserWarning, stacklevel=3)


def merge_adapters(
    model: nn.Module,
    config: Mapping[str, int] | None = None,
    *,
    keep_sparsity: bool = True,
    probe_tokens: int = 64,
) -> nn.Module:
    """Merge the sub-adapter of ``config`` into the base and remove every adapter, in place.

    Each ``ElasticLoRALinear`` is replaced by its ``base_layer``, whose weight becomes
    ``base + delta`` of the active sub-adapter in the base's dtype (the sum is formed in
    fp32). Every parameter's ``requires_grad`` returns to what it was before
    ``add_elastic_lora``.

    Args:
        model: a model carrying elastic adapters.
        config: group -> rank to activate first; ``None`` keeps the active configuration, a
            partial one changes only its groups. Validated before anything changes
            (``KeyError`` for an unknown group, ``ValueError`` for a rank outside its list).
        keep_sparsity: keep every zero of the base. Exact for ``sparse_adapter=True``
            adapters (their update is already masked); a dense adapter's update is masked
            too, and a warning gives, on a probe ``X`` (:func:`probe_input`), the relative
            change of the merged layers' outputs ``||X (delta * (W == 0))^T|| /
            ||X (W + delta)^T||`` and the share of the update removed ``||X (delta *
            (W == 0))^T|| / ||X delta^T||``, mean and max over the masked layers. The first
            is small when the update is small next to W; the second says how much of what
            the adapters learned was cut. ``False`` adds the
            update everywhere and warns with the merged maps' sparsity before and after
            when zeros were lost.
        probe_tokens: rows of the Gaussian probe behind that warning.

    Returns:
        The model, without any shears module (a top-level adapter returns its base layer).
    """
    modules = list(elastic_modules(model))
    if not modules:
        raise ValueError("the model carries no elastic LoRA adapters; nothing to merge")
    _refuse_4bit_base(modules)
    if config is not None:
        set_config(model, config)  # validates the whole config before changing anything
    merged = []
    for name, m in modules:
        merged.append(_merge_one(name, m, keep_sparsity, probe_tokens))
        if not name:  # the model itself is the adapter
            model = m.base_layer
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.base_layer)
    _restore_requires_grad(model)
    clear_adapter_metadata(model)  # config.json must not describe adapters that are gone
    _warn(merged, keep_sparsity, probe_tokens)
    return model
