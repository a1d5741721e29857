"""A saved super-adapter layout against the model it is loaded onto: names and fields.

A layout names modules relative to the module ``add_elastic_lora`` (or ``save_adapter``)
was given: ``add_elastic_lora(model.model, ...)`` writes ``layers.0.self_attn.q_proj`` into
``config.json``, while ``model.save_pretrained`` names the tensors
``model.layers.0.self_attn.q_proj.lora_A``. :func:`rebase` renames a layout (and its
tensors) by one prefix, and :func:`relative_to` finds the prefix that makes every saved name
a module of the model at hand, so each combination loads. :func:`check_layout` compares a
saved layout with adapters already on the model, field by field.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shears.adapters import adapter_layout, elastic_modules
from shears.adapters.metadata import FINGERPRINT_KEY, GRID_STATE_KEY

# Layout entries keyed by module name (renamed with the modules); "groups" values are the
# group keys the saved configuration uses, and stay as saved.
_PER_MODULE = ("groups", "shapes", FINGERPRINT_KEY, GRID_STATE_KEY)
# Fields of the layout that change the adapters' maths. rank_mode does not (slice and mask
# compute the same function), so a model already carrying adapters keeps its own.
FIELDS = ("ranks", "alpha", "dropout", "sparse_adapter")


def rebase(meta: dict[str, Any], tensors: dict[str, torch.Tensor], old: str, new: str):
    """The layout and ``{<module>.<key>: tensor}`` with the module-name prefix ``old`` replaced
    by ``new`` (prefixes end with a dot, or are empty)."""
    def rename(name: str) -> str:
        assert name.startswith(old), (name, old)
        return new + name[len(old):]

    out = dict(meta, targets=[rename(t) for t in meta["targets"]])
    for key in _PER_MODULE:
        if meta.get(key) is not None:
            out[key] = {rename(n): v for n, v in meta[key].items()}
    return out, {rename(k): v for k, v in tensors.items()}


def prefixes_to(names: set[str], saved: list[str]) -> list[tuple[str, str]]:
    """Every ``(old, new)`` prefix pair that maps all ``saved`` names into ``names``: the
    identity, a prefix to add (saved relative to a submodule) or one to strip (saved from a
    larger model)."""
    first = saved[0]
    pairs = {("", "")}
    pairs |= {("", n[: -len(first)]) for n in names if n.endswith("." + first)}
    parts = first.split(".")
    pairs |= {(".".join(parts[:i]) + ".", "") for i in range(1, len(parts))}
    return sorted(p for p in pairs
                  if all(t.startswith(p[0]) and p[1] + t[len(p[0]):] in names for t in saved))


def relative_to(model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """The layout and tensors renamed so that every target is a module of ``model``.

    Unchanged when the names already fit; ``ValueError`` when no single prefix (or more than
    one) fits, naming a saved module the model lacks.
    """
    names = {n for n, _ in model.named_modules()}
    pairs = prefixes_to(names, meta["targets"])
    if ("", "") in pairs:
        return meta, tensors
    if len(pairs) != 1:
        lacking = next(t for t in meta["targets"] if t not in names)
        found = f"several prefixes fit: {pairs}" if pairs else "no prefix maps them onto it"
        raise ValueError(f"the model has no module {lacking} to carry a saved adapter ({found})")
    return rebase(meta, tensors, *pairs[0])


def check_layout(model: nn.Module, meta: dict[str, Any]) -> None:
    """Refuse (``ValueError`` naming the field) a model whose adapters differ from ``meta``
    in targets, ranks, alpha, dropout, sparse_adapter, groups or shapes. No-op without
    adapters."""
    if not any(True for _ in elastic_modules(model)):
        return
    have = adapter_layout(model, fingerprint=False)  # raises if its own adapters disagree
    missing = sorted(set(meta["targets"]) - set(have["targets"]))
    extra = sorted(set(have["targets"]) - set(meta["targets"]))
    if missing or extra:
        raise ValueError(f"the model's adapters differ from the saved ones in targets: "
                         f"missing {missing[:4]}, unexpected {extra[:4]}")
    for field in FIELDS:
        saved, own = meta[field], have[field]
        if field in ("alpha", "dropout"):
            saved, own = float(saved), float(own)
        if saved != own:
            raise ValueError(f"the model's adapters differ from the saved ones in {field}: "
                             f"{own!r} on the model, {saved!r} saved")
    for field in ("groups", "shapes"):
        for name in meta["targets"]:
            if _as_list(meta[field][name]) != _as_list(have[field][name]):
                raise ValueError(f"the model's adapters differ from the saved ones in {field}: "
                                 f"{name} has {have[field][name]!r}, saved "
                                 f"{meta[field][name]!r}")


def _as_list(value: Any) -> Any:
    """JSON turns tuples into lists: compare them as lists."""
    return list(value) if isinstance(value, tuple) else value
