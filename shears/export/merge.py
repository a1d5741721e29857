"""Merge one sub-adapter into the base: plain layers again, no shears module left.

Adapters trained with ``sparse_adapter=True`` merge exactly and keep every zero of the base;
for dense adapters on a sparse base the caller chooses (``keep_sparsity``): nothing is lost
by default. Every check runs before the first change.

After ``merge_adapters`` the model holds no shears module, so ``model.save_pretrained(d)``
writes an ordinary checkpoint that ``AutoModelForCausalLM.from_pretrained(d)`` loads.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import nn

from shears.adapters import (
    ElasticLoRALinear,
    clear_adapter_metadata,
    elastic_modules,
    set_config,
)
from shears.adapters.inject import REQUIRES_GRAD_ATTR
from shears.adapters.layer import check_flag
from shears.quantization import check_scales, clear_grid, grid_of, qa_merged_weight
from shears.quantization.bnb import is_bnb_4bit
from shears.quantization.record import refresh_grid_record

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
    merged = _merged_on_grid(m, w, delta)
    if merged is None:
        merged = (w.float() + delta).to(w.dtype)
    w.copy_(merged)
    info.zeros_after = int((merged == 0).sum())
    return info


def _default_keep_sparsity(modules: list[tuple[str, ElasticLoRALinear]]) -> bool:
    """``keep_sparsity=None``: True where that loses nothing, else a ValueError (no change).

    ``sparse_adapter=True`` updates are already masked, and masking a dense update by a map
    without zeros drops nothing; a dense update on a map with zeros leaves a real choice.
    """
    dense = [name for name, m in modules
             if not m.sparse_adapter and bool((m.base_weight() == 0).any())]
    if not dense:
        return True
    raise ValueError(
        f"merge_adapters: {len(dense)} of {len(modules)} adapters were trained dense "
        f"(sparse_adapter=False) on maps with zeros (e.g. {dense[0]!r}), so no merge is both "
        "exact and sparse, and nothing was changed. Choose: keep_sparsity=True keeps every "
        "zero of the base but masks the update (sparse but lossy: the merged model differs "
        "from the adapted one, and a warning measures by how much); keep_sparsity=False adds "
        "the whole update (exact but dense: the merged maps lose their zeros). Or keep the "
        "sub-adapter unmerged: use the adapted model as it is, save_adapter(model, d), or "
        "export_peft(model, d) for stock PEFT. Adapters trained with sparse_adapter=True "
        "merge exactly and sparse by default.")


def _storage(t: torch.Tensor) -> tuple[str, int]:
    """Where a tensor's data lives: tensors that share it (views included) share the key."""
    try:
        return str(t.device), t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without a plain storage
        return "object", id(t)


def _shared_bases(model: nn.Module, modules: list[tuple[str, ElasticLoRALinear]]):
    """The adapted maps whose base weight another tensor of ``model`` shares (same storage).

    Merging writes into the base weight, so a sharer would change too. Transformers' tied
    word embeddings (an adapter on a tied ``lm_head``) can be untied, recorded on the config
    so that a reload keeps them apart: returns ``[(module name, base layer, sharer name)]``
    for those. Any other sharing raises ``ValueError`` (nothing has changed yet).
    """
    owners: dict[tuple[str, int], list[str]] = {}
    for n, t in [*model.named_parameters(remove_duplicate=False),
                 *model.named_buffers(remove_duplicate=False)]:
        if t.device.type != "meta" and t.numel():  # empty tensors all point at 0
            owners.setdefault(_storage(t), []).append(n)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    config = getattr(model, "config", None)
    untie = []
    for name, m in modules:
        own = f"{name}.base_layer.weight" if name else "base_layer.weight"
        weight = m.base_layer.weight
        sharers = [] if weight.device.type == "meta" else [
            n for n in owners.get(_storage(weight), []) if n != own]
        if not sharers:
            continue
        plain = f"{name}.weight" if name else "weight"  # its name once merged
        partners = {v for k, v in tied.items() if k == plain} | {k for k, v in tied.items()
                                                                  if v == plain}
        others = {k: v for k, v in tied.items() if plain not in (k, v)}
        if (len(sharers) == 1 and sharers[0] in partners and not others
                and getattr(config, "tie_word_embeddings", False)):
            untie.append((name, m.base_layer, sharers[0]))
            continue
        raise ValueError(
            f"{name}: its base weight is shared with {sharers}, so merging the adapter would "
            "change them too; nothing was changed. merge_adapters unties only transformers' "
            "tied word embeddings (config.tie_word_embeddings, no other tie in the model). "
            "Untie the weight yourself (give the module its own nn.Parameter) or keep the "
            "adapter unmerged.")
    return untie


def _untie(model: nn.Module, untie: list) -> None:
    """Give each base layer of ``untie`` its own copy of the shared weight, and record it:
    ``tie_word_embeddings=False`` so that ``tie_weights`` and a reload keep it untied."""
    for _, base, _ in untie:
        base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
    if untie:
        model.config.tie_word_embeddings = False
        model.all_tied_weights_keys = {}  # transformers' mapping; it held only this tie


def _merged_on_grid(m: ElasticLoRALinear, w: torch.Tensor, delta: torch.Tensor):
    """Over a base quantized by ``quantize_base``: a sparse adapter (QA-SparsePEFT) merges to
    the QA forward's weight, on the base's grid with every zero kept; a dense one cannot stay
    on the grid, so the map forgets its grid (``None``: the plain sum is written)."""
    grid = grid_of(m.base_layer)
    if grid is None:
        return None
    if not m.sparse_adapter:
        clear_grid(m.base_layer)
        return None
    return qa_merged_weight(w, delta, grid)


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


def _check_arguments(config, keep_sparsity, probe_tokens) -> None:
    """The types of merge_adapters' arguments (a flag read by truthiness would take "no" for
    True; a list of ranks is not a configuration)."""
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"config: a configuration is a mapping group -> rank, or None for the "
                        f"active one; got {type(config).__name__} {config!r}")
    if keep_sparsity is not None:
        check_flag("keep_sparsity", keep_sparsity)
    if isinstance(probe_tokens, bool) or not isinstance(probe_tokens, Integral) \
            or probe_tokens < 1:
        raise ValueError(f"probe_tokens must be a positive int, got {probe_tokens!r}")


def _refuse_broken_grids(modules: list[tuple[str, ElasticLoRALinear]]) -> None:
    """A NaN, inf or zero scale would merge into NaN weights (and export would then call the
    map "off its grid"): refuse it here, naming the map, before anything changes."""
    for name, m in modules:
        if m.sparse_adapter:
            check_scales(name, m.base_layer)


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
    keep_sparsity: bool | None = None,
    probe_tokens: int = 64,
) -> nn.Module:
    """Merge the sub-adapter of ``config`` into the base and remove every adapter, in place.

    Each ``ElasticLoRALinear`` is replaced by its ``base_layer``, whose weight becomes
    ``base + delta`` of the active sub-adapter in the base's dtype (the sum is formed in
    fp32). Every parameter's ``requires_grad`` returns to what it was before
    ``add_elastic_lora``. Everything is checked before the model changes.

    Args:
        model: a model carrying elastic adapters.
        config: group -> rank to activate first; ``None`` keeps the active configuration, a
            partial one changes only its groups. Validated before anything changes
            (``KeyError`` for an unknown group, ``ValueError`` for a rank outside its list).
        keep_sparsity: ``None`` (default) merges exactly and keeps every zero where both are
            possible: adapters trained with ``sparse_adapter=True`` (their update is already
            masked), or dense ones on maps without zeros. Dense adapters on a sparse base
            raise ``ValueError`` naming the choices, and nothing changes. ``True`` keeps
            every zero and masks a dense update too, with a warning that gives, on a probe
            ``X`` (:func:`probe_input`), the relative change of the merged layers' outputs
            ``||X (delta * (W == 0))^T|| / ||X (W + delta)^T||`` and the share of the update
            removed ``||X (delta * (W == 0))^T|| / ||X delta^T||``, mean and max over the
            masked layers. ``False`` adds the whole update (exact, but the base loses its
            zeros) and warns with the merged maps' sparsity before and after.
        probe_tokens: rows of the Gaussian probe behind the ``keep_sparsity=True`` warning,
            a positive int.

    Raises ``TypeError`` for a ``config`` that is not a mapping and a ``keep_sparsity`` that
    is not None or a bool; ``ValueError`` for the refusals above, a 4-bit base, a map whose
    recorded grid has NaN/inf or non-positive scales (QA-SparsePEFT), a bad ``probe_tokens``.

    An adapted ``lm_head`` whose weight is tied to the input embeddings gets its own weight
    (the embeddings keep theirs) and ``config.tie_word_embeddings`` becomes False, so that
    ``save_pretrained`` + ``from_pretrained`` keep them apart; a base weight shared in any
    other way raises ``ValueError``.

    Returns:
        The model, without any shears module (a top-level adapter returns its base layer).
    """
    modules = list(elastic_modules(model))
    if not modules:
        raise ValueError("the model carries no elastic LoRA adapters; nothing to merge")
    # Checks only, up to set_config (which validates the whole config before applying it).
    _check_arguments(config, keep_sparsity, probe_tokens)
    _refuse_4bit_base(modules)
    _refuse_broken_grids(modules)
    if keep_sparsity is None:
        keep_sparsity = _default_keep_sparsity(modules)
    untie = _shared_bases(model, modules)
    if config is not None:
        set_config(model, config)
    _untie(model, untie)
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
    for _, base, sharer in untie:  # the copy trains as the shared weight did
        base.weight.requires_grad_(model.get_parameter(sharer).requires_grad)
    clear_adapter_metadata(model)  # config.json must not describe adapters that are gone
    refresh_grid_record(model)  # nor grids that a dense merge forgot
    _warn(merged, keep_sparsity, probe_tokens)
    return model
