"""Save and load a trained super-adapter: one JSON file and one safetensors file, no pickle.

``super_adapter_config.json`` holds what ``add_elastic_lora`` needs to rebuild the adapters
(targets, ranks, alpha, dropout, groups, sparse_adapter, rank_mode), the active
configuration and a fingerprint of the base (``base_fingerprint``, see
``shears.adapters.metadata``) (files written before ``rank_mode`` existed load in
``"slice"`` mode, files without a fingerprint load unchecked);
``super_adapter.safetensors`` holds ``<module>.lora_A`` (r_max, in) and ``<module>.lora_B``
(out, r_max) in fp32. The base model is not saved: load onto the same (pruned) base.

The two files are written as one save (``shears.atomic.atomic_folder``): the JSON, which
declares the folder, is removed first and written last, and it records ``adapter_digest``,
a sha256 of the tensors (``shears.adapters.metadata.adapter_digest``) that ``load_adapter``
checks. After a crash the folder holds the previous complete save, or weights without their
JSON, which ``load_adapter`` refuses naming the folder; never new weights under an old JSON.

``load_adapter`` also reads the super-adapter out of a ``save_pretrained`` directory or a
``Trainer`` checkpoint of a model carrying adapters (``checkpoint.py``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

try:  # FSDP2 shards parameters as DTensors; builds without torch.distributed lack them
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()

from shears.adapters import (
    ElasticLoRALinear,
    adapter_layout,
    add_elastic_lora,
    elastic_modules,
    get_config,
    set_config,
    validate_config,
)
from shears.adapters.layer import check_flag, layer_features
from shears.adapters.metadata import (
    DIGEST_KEY,
    FINGERPRINT_KEY,
    FORMAT,
    FORMAT_VERSION,
    GRID_STATE_KEY,
    adapter_digest,
    fingerprint_difference,
    weight_fingerprint,
)
from shears.atomic import atomic_folder, read_json
from shears.pruning.layers import weight_matrix
from shears.quantization import grid_state
from shears.quantization.bnb import dequantized_weight, is_bnb_4bit
from shears.quantization.record import describe_state

from .checkpoint import HF_CONFIG_NAME, read_checkpoint_adapter
from .integrity import check_digest, read_safetensors
from .layout import check_layout, relative_to

CONFIG_NAME = "super_adapter_config.json"
WEIGHTS_NAME = "super_adapter.safetensors"


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself, or the whole of an FSDP2 shard (a collective on every process)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the super-adapter of ``model`` (all ranks, plus the active config) to ``directory``.

    Returns the directory. The base weights are not written. Under FSDP (adapters sharded
    as DTensors) call it on every process: the shards are gathered, and process 0 writes.
    """
    modules = list(elastic_modules(model))
    if not modules:
        raise ValueError("the model carries no elastic LoRA adapters; nothing to save")
    meta = dict(adapter_layout(model), config=get_config(model))
    tensors = {}
    for name, m in modules:
        for key in ("lora_A", "lora_B"):
            t = _whole(getattr(m, key).detach())
            tensors[f"{name}.{key}"] = t.to("cpu", torch.float32).contiguous()
    out = Path(directory)
    if isinstance(modules[0][1].lora_A, DTensor) and dist.get_rank() != 0:
        return out  # this process took part in the gather; process 0 writes
    meta[DIGEST_KEY] = adapter_digest(meta["targets"], tensors)  # of the bytes written
    with atomic_folder(out, declaring=[CONFIG_NAME]) as stage:  # the JSON goes in last
        save_file(tensors, str(stage / WEIGHTS_NAME), metadata={"format": "pt"})
        (stage / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    return out


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON description written by ``save_adapter``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}; was it written by save_adapter?")
    meta = read_json(path, "super-adapter config")
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a version-{FORMAT_VERSION} shears super-adapter")
    return meta


def _attach(model: nn.Module, meta: dict[str, Any]) -> None:
    """Apply add_elastic_lora exactly as saved, unless the model carries adapters already
    (``check_layout`` has compared them with ``meta``)."""
    if not any(True for _ in elastic_modules(model)):
        exact = "|".join(re.escape(t) for t in meta["targets"])
        add_elastic_lora(model, exact, ranks=meta["ranks"], alpha=meta["alpha"],
                         dropout=meta["dropout"], groups=meta["groups"].__getitem__,
                         sparse_adapter=meta["sparse_adapter"],
                         rank_mode=meta.get("rank_mode", "slice"))  # absent before rank_mode
    present = [name for name, _ in elastic_modules(model)]
    if sorted(present) != sorted(meta["targets"]):
        raise ValueError(f"the model's adapters do not match the saved ones: missing "
                         f"{sorted(set(meta['targets']) - set(present))[:4]}, unexpected "
                         f"{sorted(set(present) - set(meta['targets']))[:4]}")


def _base_matrix(module: nn.Module) -> torch.Tensor:
    """The (out, in) base weight the fingerprint describes, adapted or not; a bitsandbytes
    4-bit map is dequantized (its stored weight is packed)."""
    if isinstance(module, ElasticLoRALinear):
        return module.base_weight()
    return dequantized_weight(module) if is_bnb_4bit(module) else weight_matrix(module)


def _check_base(model: nn.Module, meta: dict[str, Any]) -> None:
    """The model's base against the fingerprint saved with the adapters (none in files
    written before it existed); ``ValueError`` naming the module and what differs."""
    fingerprints = meta.get(FINGERPRINT_KEY) or {}
    for name in [t for t in meta["targets"] if t in fingerprints]:  # config.json sorts keys
        saved = fingerprints[name]
        module = model.get_submodule(name)
        have = weight_fingerprint(_base_matrix(module))
        problem = None if have is None else fingerprint_difference(saved, have)
        if problem:
            raise ValueError(f"{name}: this base is not the one the adapters were saved with: "
                             f"{problem}. Load onto the base they were trained on (the same "
                             "pruned model), or pass check_base=False to load anyway.")


def _grid_advice(saved: list[int] | None, have: list[int] | None) -> str:
    """How to get the base the adapters need, for one grid mismatch."""
    if have is None:
        return ("Restore the base's grid: shears.load_grid(model, checkpoint) for a "
                "save_pretrained checkpoint of the quantized base, or shears.quantize_base("
                f"model, bits={saved[0]}, group_size={saved[1]}) on the same unquantized "
                "pruned base")
    if saved is None:
        return ("Load them onto the base they were trained on, without a grid (the pruned "
                "model before quantize_base)")
    return "Load them onto the base quantized as it was when they were saved"


def _check_grid(model: nn.Module, meta: dict[str, Any]) -> None:
    """The grid state of each adapted base against the saved one (none in files written
    before it existed: unchecked, assumed to be the base's own). Sparse adapters only: over
    a grid they are QA-SparsePEFT (forward ``Q(W + delta)`` on the grid), without one plain
    SparsePEFT, so a mismatch changes the function in either direction; a dense adapter's
    forward ``base(x) + update`` does not depend on the grid."""
    saved_states = meta.get(GRID_STATE_KEY)
    if saved_states is None or not meta["sparse_adapter"]:
        return
    for name in [t for t in meta["targets"] if t in saved_states]:
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, ElasticLoRALinear) else module
        saved = None if saved_states[name] is None else list(saved_states[name])
        have = grid_state(base)
        if saved != have:
            raise ValueError(
                f"{name}: the sparse adapters were saved over {describe_state(saved)}, and "
                f"this base has {describe_state(have)}. Over a grid they train and compute "
                "quantization-aware (QA-SparsePEFT: Q(W + delta) on the grid), without one as "
                "plain SparsePEFT, so here they would compute another function. "
                f"{_grid_advice(saved, have)}, or pass check_base=False to load anyway.")


def _check_shapes(model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """Saved A (r_max, in) and B (out, r_max) must fit the JSON and the model's base layers."""
    r_max = max(meta["ranks"])
    for name, (out_f, in_f) in meta["shapes"].items():
        for key, shape in ((f"{name}.lora_A", (r_max, in_f)), (f"{name}.lora_B", (out_f, r_max))):
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"{key}: saved tensor {tuple(tensors[key].shape)}, "
                                 f"expected {shape}")
        try:
            base = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"the model has no module {name} to carry a saved adapter") from e
        w = layer_features(getattr(base, "base_layer", base))  # a 4-bit weight is packed
        if sorted(w) != sorted((out_f, in_f)):
            raise ValueError(f"{name}: base weight {tuple(w)} does not fit the saved adapter "
                             f"(out={out_f}, in={in_f})")


def _read_saved_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The files of ``save_adapter``: layout and config (JSON), ``{<module>.lora_A/B: tensor}``."""
    meta = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    tensors = read_safetensors(weights)
    expected = {f"{t}.lora_{ab}" for t in meta["targets"] for ab in "AB"}
    if set(tensors) != expected:
        raise ValueError(f"{weights}: missing tensors {sorted(expected - set(tensors))[:4]}, "
                         f"unexpected {sorted(set(tensors) - expected)[:4]}")
    check_digest(meta, tensors, f"{directory}: {WEIGHTS_NAME} and {CONFIG_NAME}")
    return meta, tensors


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, *, check_base: bool = True
) -> nn.Module:
    """Attach the saved super-adapter to ``model`` in place and activate the saved config.

    ``directory`` was written by ``save_adapter``, or by ``save_pretrained`` (or a
    ``Trainer`` checkpoint) of a model carrying adapters; when it holds both, the
    ``save_adapter`` files are read. ``model`` is the base the adapter was trained on
    (without adapters, e.g. ``AutoModelForCausalLM.from_pretrained(directory)``, or with
    adapters of the same layout, whose weights are then overwritten), or a module of it or a
    model containing it: saved module names are matched by one prefix added or removed.
    Checked before the model changes: tensors and shapes; an adapted model's layout, every
    field (targets, ranks, alpha, dropout, sparse_adapter, groups, shapes; its own
    ``rank_mode`` is kept, as it does not change the maths); the configuration; and, with
    ``check_base``, the base against the fingerprint saved with the adapters (zero count and
    a sample checksum per map; files saved without one skip it) and, for sparse adapters,
    each base's grid state (``quantize_base``'s bits and group size, or none) against the
    saved one, in both directions: QA-SparsePEFT adapters need their grid (restore it with
    ``shears.load_grid``), plain SparsePEFT adapters a base without one (files saved before
    the grid state was recorded skip it: the base is assumed to be the one they were saved
    over). The weights must be the ones the layout was saved with (``adapter_digest``;
    ``ValueError`` "... come from two different saves"), and ``super_adapter.safetensors``
    without its JSON (an interrupted ``save_adapter``) is refused rather than read past.
    """
    check_base = check_flag("check_base", check_base)
    directory = Path(directory)
    if (directory / CONFIG_NAME).is_file():
        meta, tensors = _read_saved_adapter(directory)
    elif (directory / WEIGHTS_NAME).is_file():  # never fall back to another save's files
        raise FileNotFoundError(
            f"{directory} holds {WEIGHTS_NAME} but no {CONFIG_NAME}: a save_adapter was "
            "interrupted after removing the old JSON (it is written last). Save again, or "
            "load an earlier copy")
    elif (directory / HF_CONFIG_NAME).is_file():
        meta, tensors = read_checkpoint_adapter(directory)
    else:
        raise FileNotFoundError(f"no {CONFIG_NAME} (save_adapter) and no {HF_CONFIG_NAME} "
                                f"(save_pretrained) in {directory}")
    meta, tensors = relative_to(model, meta, tensors)  # names as ``model`` has them
    _check_shapes(model, meta, tensors)  # everything is checked before the model changes
    space = {g: sorted(meta["ranks"], reverse=True) for g in meta["groups"].values()}
    validate_config(space, meta["config"])
    check_layout(model, meta)
    if check_base:  # the grid first: a re-gridded base fails the fingerprint too
        _check_grid(model, meta)
        _check_base(model, meta)
    _attach(model, meta)
    for name, m in elastic_modules(model):
        with torch.no_grad():
            m.lora_A.copy_(tensors[f"{name}.lora_A"])
            m.lora_B.copy_(tensors[f"{name}.lora_B"])
    set_config(model, meta["config"])
    return model
