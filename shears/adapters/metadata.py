"""The layout of a model's super-adapter, recorded on ``model.config`` for ``config.json``.

``add_elastic_lora`` records it as ``model.config.shears_super_adapter``, so every
``save_pretrained`` (and every ``Trainer`` checkpoint) writes it into ``config.json`` with
no extra call, and ``shears.export.load_adapter`` rebuilds the adapters from that directory.
The active configuration is not part of it: it changes at every NLS step while
``config.json`` is written before the weights, so each adapter saves its own active rank
in the state dict instead (``lora_active_rank``, see ``layer.py``).

A model loaded with plain ``from_pretrained`` from such a directory keeps the entry on its
config although it carries no adapters; ``add_elastic_lora`` replaces it with the new
layout, and ``clear_adapter_metadata`` removes it (call it when the adapters go away, e.g.
after merging them into the base).

The layout also carries a cheap fingerprint of the base (``base_fingerprint``: per adapted
map its shape, its zero count and two fp64 sums over a strided sample of at most about
64 x 64 weights), so that ``load_adapter`` can refuse a base other than the one the adapters
were trained on, and the grid state of each adapted map's base (``base_grid``: bits and
group size of ``quantize_base``'s grid, or None), which the fingerprint cannot see and which
makes a sparse adapter QA-SparsePEFT. ``save_adapter`` computes both when it writes; the
entry on ``model.config`` computes them afresh whenever the config is serialised
(``config.json``), so it describes the base as saved, also when the base was pruned or
loaded (or its grid restored) after ``add_elastic_lora``.

It also carries ``adapter_digest``, a sha256 of the adapter tensors as saved
(:func:`adapter_digest`), computed at the same moment, so that a loader can tell when the
layout and the weights beside it come from two different saves (transformers writes
``config.json`` before the weights: a ``save_pretrained`` killed in between leaves the new
layout over the previous weights).
"""

from __future__ import annotations

import copy
import hashlib
import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from shears.quantization import grid_state

from .index import elastic_modules

try:  # FSDP2 shards the base as DTensors: gathering it for a fingerprint would cost a model
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()

METADATA_KEY = "shears_super_adapter"
FORMAT = "shears-super-adapter"
FORMAT_VERSION = 1
FINGERPRINT_KEY = "base_fingerprint"
# module -> [bits, group_size] of the grid its base carries (quantize_base), or None. The
# fingerprint cannot see a grid (the base's weights are the same with or without one), but
# a sparse adapter over a grid computes another function (QA-SparsePEFT: Q(W + delta)).
GRID_STATE_KEY = "base_grid"
DIGEST_KEY = "adapter_digest"
SAMPLE_SIDE = 64  # the strided sample takes every (out // 64)-th row and (in // 64)-th column
# A base cast to another dtype must pass: fp16 flushes weights below 6e-8 to zero (about 2 in a
# million for weights of std 0.02), and bf16 rounding moves the sample sums by ~1e-5
# relatively. A dense base (50% more zeros), another pruning or other weights move them far more.
ZERO_TOLERANCE = 1e-4  # of the map's elements
SUM_TOLERANCE = 1e-3  # of the sample's sum of |w|


def weight_fingerprint(w: torch.Tensor) -> dict[str, Any] | None:
    """A cheap fingerprint of one (out, in) base weight, or None for a meta or sharded one.

    ``shape``; ``zeros``, the exact zero count (one pass); ``abs_sum`` and ``sum``, fp64 sums
    of |w| and w over the strided sample ``w[::max(1, out // 64), ::max(1, in // 64)]``.
    """
    if w.device.type == "meta" or isinstance(w, DTensor) or w.dim() != 2:
        return None
    out_f, in_f = w.shape
    sample = w[:: max(1, out_f // SAMPLE_SIDE), :: max(1, in_f // SAMPLE_SIDE)].double()
    return {"shape": [out_f, in_f], "zeros": int(w.numel() - torch.count_nonzero(w)),
            "abs_sum": float(sample.abs().sum()), "sum": float(sample.sum())}


def adapter_digest(targets: Sequence[str], tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over each target's ``lora_A`` then ``lora_B`` (dtype, shape, bytes as stored),
    in ``targets`` order; ``tensors`` maps ``<target>.lora_A`` / ``.lora_B`` to them.

    Module names are not hashed (a layout and its tensors may be renamed by one prefix, see
    ``export/layout.py``), so the digest ties a layout to the weights saved with it whatever
    the names.
    """
    h = hashlib.sha256()
    for target in targets:
        for key in ("lora_A", "lora_B"):
            t = tensors[f"{target}.{key}"].detach().to("cpu").contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def live_adapter_digest(model: nn.Module) -> str | None:
    """:func:`adapter_digest` of the model's adapters as ``state_dict`` holds them; None when
    one is sharded (FSDP2) or on the meta device (no bytes to hash without a gather)."""
    modules = list(elastic_modules(model))
    tensors = {}
    for name, m in modules:
        for key in ("lora_A", "lora_B"):
            t = getattr(m, key)
            if t.device.type == "meta" or isinstance(t, DTensor):
                return None
            tensors[f"{name}.{key}"] = t
    return adapter_digest([n for n, _ in modules], tensors)


def fingerprint_difference(saved: dict[str, Any], have: dict[str, Any]) -> str | None:
    """What differs between two fingerprints of one map, in words; None if they match."""
    if list(saved["shape"]) != list(have["shape"]):
        return f"base weight shape {have['shape']} here, {saved['shape']} saved"
    numel = math.prod(have["shape"])
    if abs(saved["zeros"] - have["zeros"]) > ZERO_TOLERANCE * numel:
        return (f"{have['zeros']} zeros of {numel} here, {saved['zeros']} saved (a dense or "
                "differently pruned base?)")
    scale = max(abs(saved["abs_sum"]), abs(have["abs_sum"]))
    for key in ("abs_sum", "sum"):
        if abs(saved[key] - have[key]) > SUM_TOLERANCE * scale:
            return (f"checksum of a strided sample ({key}) {have[key]:.7g} here, "
                    f"{saved[key]:.7g} saved (other weights under the same names?)")
    return None


def _cached_fingerprint(m: Any) -> dict[str, Any] | None:
    """weight_fingerprint of an adapter's base, recomputed only when the weight changed
    (another tensor, dtype or device, or an in-place write: torch's version counter)."""
    w = m.base_weight()
    if w.device.type == "meta" or isinstance(w, DTensor):  # no data pointer to key on
        return None
    key = (w.data_ptr(), w._version, w.dtype, str(w.device), tuple(w.shape))
    cached = m.__dict__.get("_shears_fingerprint")
    if cached is None or cached[0] != key:
        cached = (key, weight_fingerprint(w))
        m.__dict__["_shears_fingerprint"] = cached
    return cached[1]


def base_fingerprint(model: nn.Module) -> dict[str, dict[str, Any]] | None:
    """``{module: weight_fingerprint}`` of every adapter's base; None if one has none."""
    out = {}
    for name, m in elastic_modules(model):
        fp = _cached_fingerprint(m)
        if fp is None:
            return None
        out[name] = fp
    return out


def base_grid(model: nn.Module) -> dict[str, list[int] | None]:
    """``{module: [bits, group_size] or None}``: the grid state of every adapter's base."""
    return {name: grid_state(m.base_layer) for name, m in elastic_modules(model)}


def shared_attribute(modules: list[tuple[str, Any]], attr: str) -> Any:
    """The one value of ``attr`` that every ``(name, adapter)`` of ``modules`` holds."""
    values = {getattr(m, attr) for _, m in modules}
    if len(values) != 1:
        raise ValueError(f"adapters disagree on {attr} ({values}); shears saves adapters made "
                         "by one add_elastic_lora call")
    return values.pop()


def adapter_layout(model: nn.Module, fingerprint: bool = True) -> dict[str, Any]:
    """What ``add_elastic_lora`` needs to rebuild the adapters of ``model`` (no weights).

    Keys: ``format``, ``version``, ``targets`` (qualified names, module order), ``ranks``,
    ``alpha``, ``dropout``, ``sparse_adapter``, ``rank_mode``, ``groups`` (module -> group key)
    ``shapes`` (module -> [out, in]), ``base_grid`` (module -> ``[bits, group_size]`` of the
    grid ``quantize_base`` put on its base, or None) and, with ``fingerprint``,
    ``base_fingerprint`` (module -> :func:`weight_fingerprint` of its base now; None under
    FSDP or on the meta device); all JSON-serialisable.
    """
    modules = list(elastic_modules(model))
    if not modules:
        raise ValueError("the model carries no elastic LoRA adapters; call add_elastic_lora first")
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "targets": [name for name, _ in modules],
        "ranks": list(shared_attribute(modules, "ranks")),
        "alpha": shared_attribute(modules, "alpha"),
        "dropout": shared_attribute(modules, "dropout_p"),
        "sparse_adapter": shared_attribute(modules, "sparse_adapter"),
        "rank_mode": shared_attribute(modules, "rank_mode"),
        "groups": {name: (m.group if m.group is not None else name) for name, m in modules},
        "shapes": {name: [m.out_features, m.in_features] for name, m in modules},
        GRID_STATE_KEY: base_grid(model),
        FINGERPRINT_KEY: base_fingerprint(model) if fingerprint else None,
    }


class _LiveLayout(dict):
    """The layout on ``model.config``. Its copies carry the base fingerprint computed at that
    moment: ``config.to_dict`` deep-copies (so every ``config.json`` gets one) and pickling
    takes one, so that the saved fingerprint describes the base as saved. A deep copy of the
    whole model gets a plain copy, fingerprinted at that moment."""

    def __init__(self, layout: dict[str, Any], model: nn.Module) -> None:
        super().__init__(layout)
        self._model = weakref.ref(model)

    def snapshot(self) -> dict[str, Any]:
        out = copy.deepcopy(dict(self))
        model = self._model()
        if model is not None and [n for n, _ in elastic_modules(model)] == self["targets"]:
            out[GRID_STATE_KEY] = base_grid(model)  # load_grid may have come after the adapters
            fp = base_fingerprint(model)
            if fp is not None:
                out[FINGERPRINT_KEY] = fp
            # hashed afresh each time (no cache: an in-place write through .data would not
            # move the version counter), so config.json names the weights written with it
            out[DIGEST_KEY] = live_adapter_digest(model)
        return out

    def __deepcopy__(self, memo: dict) -> dict[str, Any]:
        return self.snapshot()

    def __reduce__(self):
        return dict, (self.snapshot(),)


def _config_of(model: nn.Module) -> PretrainedConfig | None:
    config = getattr(model, "config", None)
    return config if isinstance(config, PretrainedConfig) else None


def record_adapter_metadata(model: nn.Module) -> bool:
    """Write ``adapter_layout(model)`` onto ``model.config``; False if it has no HF config."""
    config = _config_of(model)
    if config is None:
        return False
    setattr(config, METADATA_KEY, _LiveLayout(adapter_layout(model), model))
    return True


def clear_adapter_metadata(model: nn.Module) -> bool:
    """Remove the super-adapter layout from ``model.config``; True if there was one.

    Call it once the model no longer carries its adapters (``merge_adapters`` does), so
    that a later ``save_pretrained`` does not describe adapters that are not there.
    """
    config = _config_of(model)
    if config is None or not hasattr(config, METADATA_KEY):
        return False
    delattr(config, METADATA_KEY)
    return True
