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
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import PretrainedConfig

from .index import elastic_modules

METADATA_KEY = "shears_super_adapter"
FORMAT = "shears-super-adapter"
FORMAT_VERSION = 1


def shared_attribute(modules: list[tuple[str, Any]], attr: str) -> Any:
    """The one value of ``attr`` that every ``(name, adapter)`` of ``modules`` holds."""
    values = {getattr(m, attr) for _, m in modules}
    if len(values) != 1:
        raise ValueError(f"adapters disagree on {attr} ({values}); shears saves adapters made "
                         "by one add_elastic_lora call")
    return values.pop()


def adapter_layout(model: nn.Module) -> dict[str, Any]:
    """What ``add_elastic_lora`` needs to rebuild the adapters of ``model`` (no weights).

    Keys: ``format``, ``version``, ``targets`` (qualified names, module order), ``ranks``,
    ``alpha``, ``dropout``, ``sparse_adapter``, ``rank_mode``, ``groups`` (module -> group key)
    and ``shapes`` (module -> [out, in]); all JSON-serialisable.
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
    }


def _config_of(model: nn.Module) -> PretrainedConfig | None:
    config = getattr(model, "config", None)
    return config if isinstance(config, PretrainedConfig) else None


def record_adapter_metadata(model: nn.Module) -> bool:
    """Write ``adapter_layout(model)`` onto ``model.config``; False if it has no HF config."""
    config = _config_of(model)
    if config is None:
        return False
    setattr(config, METADATA_KEY, adapter_layout(model))
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
