"""What ties one save together, checked when it is read back.

- :func:`read_safetensors` / :func:`open_safetensors`: a truncated or corrupt safetensors file
  raises a ``ValueError`` naming it (safetensors' own error names no file).
- :func:`check_digest`: the ``adapter_digest`` a layout records (``config.json`` of a
  ``save_pretrained``, ``super_adapter_config.json`` of ``save_adapter``) against the tensors
  read beside it, so that the halves of two saves are never loaded together.
- :func:`hf_weight_file`: the names ``save_pretrained`` gives the weights (``model.safetensors``,
  its shards, its index), so that a writer removes those it writes past (a stale index would
  send loaders and vLLM to shards that are gone).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from shears.adapters.metadata import DIGEST_KEY, adapter_digest


def _unreadable(path: str | os.PathLike, e: Exception) -> ValueError:
    return ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated "
                      "by an interrupted write: save again, or restore a complete copy")


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``; ``ValueError`` naming it if corrupt."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise _unreadable(path, e) from e


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike) -> Iterator[Any]:
    """``safe_open(path, "pt")``; ``ValueError`` naming the file if it is corrupt."""
    try:
        f = safe_open(str(path), "pt")
    except SafetensorError as e:
        raise _unreadable(path, e) from e
    with f:
        yield f


def check_digest(meta: dict[str, Any], tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse (``ValueError``, starting with ``what``: the folder and its two files) tensors
    whose :func:`adapter_digest` differs from the one ``meta`` records; files written before
    the digest existed (or under FSDP, where none is computed) are not checked."""
    saved = meta.get(DIGEST_KEY)
    if saved is None:
        return
    have = adapter_digest(meta["targets"], tensors)
    if have != saved:
        raise ValueError(
            f"{what} come from two different saves: the adapter weights hash to {have[:23]}..., "
            f"the layout records {saved[:23]}... (a save interrupted between the two files, or "
            "files copied from two saves). Save again, or restore a complete copy")


def hf_weight_file(variant: str | None = None) -> Callable[[str], bool]:
    """``name -> bool``: is ``name`` one of the weight files ``save_pretrained(variant=...)``
    writes (``model[.variant].safetensors``, ``model[.variant]-00001-of-00002.safetensors``,
    ``model.safetensors.index[.variant].json``)? Other variants, ``.bin`` files and everything
    else a user keeps in the folder answer False."""
    stem = "model" if variant is None else f"model.{variant}"
    index = "model.safetensors.index.json" if variant is None else \
        f"model.safetensors.index.{variant}.json"
    weights = re.compile(re.escape(stem) + r"(-\d{5}-of-\d{5})?\.safetensors")
    return lambda name: name == index or weights.fullmatch(name) is not None

