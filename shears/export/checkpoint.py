"""Read the super-adapter out of a ``save_pretrained`` directory (or a Trainer checkpoint).

Such a directory holds the adapter layout in ``config.json`` (``shears_super_adapter``,
written by ``add_elastic_lora`` onto ``model.config``) and, among the base weights of
``model.safetensors`` (or the shards named by ``model.safetensors.index.json``), the tensors
``<module>.lora_A`` (r_max, in), ``<module>.lora_B`` (out, r_max) and
``<module>.lora_active_rank`` (0-d int64) of every adapted module. Only the adapter tensors
are read (``safe_open``), never the base weights.

The layout records the ``adapter_digest`` of the adapter tensors saved with it; they are
checked against it, because transformers writes ``config.json`` before the weights (a
``save_pretrained`` killed in between leaves a new layout over the previous weights). A
``model.safetensors.index.json`` whose shards are gone beside a ``model.safetensors`` is left
from an earlier sharded save (transformers 5.x removes the shards, not the index, when it
re-saves unsharded) and is ignored, as ``from_pretrained`` does; a folder holding both
layouts complete is refused (``from_pretrained`` would read ``model.safetensors``, which a
sharded re-save leaves behind).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from shears.adapters import METADATA_KEY
from shears.adapters.layer import ACTIVE_RANK_KEY
from shears.adapters.metadata import FORMAT, FORMAT_VERSION
from shears.atomic import read_json

from .integrity import check_digest, open_safetensors
from .layout import prefixes_to, rebase

HF_CONFIG_NAME = "config.json"
HF_WEIGHTS_NAME = "model.safetensors"
HF_INDEX_NAME = "model.safetensors.index.json"


def read_checkpoint_metadata(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``shears_super_adapter`` entry of ``directory/config.json``, or None."""
    path = Path(directory) / HF_CONFIG_NAME
    if not path.is_file():
        return None
    meta = read_json(path, "model config").get(METADATA_KEY)
    if meta is None:
        return None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: {METADATA_KEY} is not a version-{FORMAT_VERSION} layout")
    return meta


def _weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (index-aware, stale index ignored)."""
    index, single = directory / HF_INDEX_NAME, directory / HF_WEIGHTS_NAME
    if index.is_file():
        weight_map = read_json(index, "weight index")["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if not missing and single.is_file():
            raise ValueError(
                f"{directory} holds {HF_WEIGHTS_NAME} and {HF_INDEX_NAME} with all its shards: "
                "one of them is left from an earlier save_pretrained of the other layout "
                f"(transformers does not remove it, and from_pretrained reads {HF_WEIGHTS_NAME})."
                " Delete the stale one, or save into an empty folder")
        if not missing:
            return {k: directory / f for k, f in weight_map.items()}
        if not single.is_file():
            raise FileNotFoundError(f"{index} names {len(missing)} shards that are not in "
                                    f"{directory}, e.g. {missing[0]} (an interrupted save or "
                                    "an incomplete copy?)")
        # else: the shards of an earlier sharded save are gone and its index stayed
    if not single.is_file():
        raise FileNotFoundError(f"neither {HF_WEIGHTS_NAME} nor {HF_INDEX_NAME} in {directory}")
    with open_safetensors(single) as f:
        return {k: single for k in f.keys()}


def _read(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    """Read ``names`` (those present), opening each file once."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for path, keys in by_file.items():
        with open_safetensors(path) as f:
            for key in keys:
                tensors[key] = f.get_tensor(key)
    return tensors


def _active_config(meta: dict[str, Any], ranks: dict[str, torch.Tensor]) -> dict[str, int]:
    """Group -> saved active rank; all modules of a group must agree. Maximal if none saved."""
    if not ranks:
        warnings.warn("the checkpoint records no active ranks (lora_active_rank); the maximal "
                      "sub-adapter is activated", stacklevel=3)
        return {g: max(meta["ranks"]) for g in meta["groups"].values()}
    config: dict[str, int] = {}
    for name, group in meta["groups"].items():
        key = f"{name}.{ACTIVE_RANK_KEY}"
        if key not in ranks:
            raise ValueError(f"the checkpoint lacks {key} although it records other active ranks")
        rank = int(ranks[key])
        if rank not in meta["ranks"] or config.setdefault(group, rank) != rank:
            raise ValueError(f"{key} = {rank}: not in {meta['ranks']} or not the rank of the "
                             f"other adapters of group {group!r} ({config[group]})")
    return config


def read_checkpoint_adapter(
    directory: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Layout (with the saved active ``config``) and ``{<module>.lora_A/B: tensor}``.

    Raises ``ValueError`` when ``config.json`` carries no layout or when an adapter tensor is
    missing (e.g. a directory saved from a plain model that had been loaded from an adapted
    checkpoint: its config still carries the layout, its weights no adapters).
    """
    directory = Path(directory)
    meta = read_checkpoint_metadata(directory)
    if meta is None:
        raise ValueError(f"no shears super-adapter in {directory}: no {HF_CONFIG_NAME} with a "
                         f"{METADATA_KEY!r} entry (written by save_pretrained of a model "
                         "carrying adapters) and no save_adapter files")
    files = _weight_files(directory)
    # add_elastic_lora(model.model) names the layout relative to model.model, while
    # model.save_pretrained names the tensors relative to model: match them by one prefix.
    adapted = {k[: -len(".lora_A")] for k in files if k.endswith(".lora_A")}
    pairs = prefixes_to(adapted, meta["targets"]) if adapted else []
    if len(pairs) == 1 and pairs[0] != ("", ""):
        meta, _ = rebase(meta, {}, *pairs[0])
    wanted = [f"{t}.lora_{ab}" for t in meta["targets"] for ab in "AB"]
    missing = [k for k in wanted if k not in files]
    if missing:
        raise ValueError(f"{directory}: config.json describes {len(meta['targets'])} adapters "
                         f"but the weights lack {len(missing)} adapter tensors, e.g. "
                         f"{missing[:3]}; were they saved from a model without its adapters?")
    tensors = _read(files, wanted)
    check_digest(meta, tensors, f"{directory}: {HF_CONFIG_NAME} and the adapter weights")
    ranks = _read(files, [f"{t}.{ACTIVE_RANK_KEY}" for t in meta["targets"]])
    return dict(meta, config=_active_config(meta, ranks)), tensors
