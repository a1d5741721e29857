"""Injection: walk a model and swap the target linear layers for elastic LoRA adapters."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from shears.quantization import check_scales
from shears.quantization.bnb import check_bnb_layer, is_bnb_4bit, keep_trainable_layout

from .layer import (
    RANK_MODES,
    ElasticLoRALinear,
    check_alpha_dropout,
    check_flag,
    layer_features,
    validate_ranks,
)
from .metadata import record_adapter_metadata

GroupSpec = str | Callable[[str], str]
_QKV = re.compile(r"(?<![^.])[qkv]_proj$")  # a whole last name component q/k/v_proj
_UP_GATE = re.compile(r"(?<![^.])(up|gate)_proj$")  # ... up_proj or gate_proj
_PARTNER = {"up": "gate_proj", "gate": "up_proj"}
_BLOCK = re.compile(r"^(.*?\.\d+)(\.|$)")  # "model.layers.3.self_attn.q_proj" -> "model.layers.3"
# Attribute of the model holding {parameter name: requires_grad} as it was before the adapters
# froze everything, so that a merge (shears.export.merge_adapters) can give it back.
REQUIRES_GRAD_ATTR = "_shears_requires_grad"


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def _suffixes(target_modules) -> list[str]:
    """``target_modules`` as a non-empty list of name suffixes, or a ``TypeError``."""
    what = (f"target_modules must be a regex (str) or a list of name suffixes, got "
            f"{type(target_modules).__name__} {target_modules!r}")
    try:
        suffixes = list(target_modules)
    except TypeError:
        raise TypeError(what) from None
    if any(not isinstance(s, str) for s in suffixes):
        raise TypeError(what)
    if not suffixes:
        raise ValueError("target_modules is empty")
    return suffixes


def match_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Qualified names of the linear layers selected by ``target_modules``.

    As in PEFT: a string is a regular expression that must match the whole qualified name;
    a list holds name suffixes (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``).
    """
    names = _linear_names(model)
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        matched = [n for n in names if pattern.fullmatch(n)]
    else:
        suffixes = _suffixes(target_modules)
        matched = [n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)]
    if not matched:
        short = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(
            f"target_modules={target_modules!r} matched no Linear/Conv1D layer; "
            f"candidate suffixes: {short}; e.g. {names[:4]}"
        )
    return matched


def group_function(groups: GroupSpec, names: Sequence[str] | None = None) -> Callable[[str], str]:
    """Turn ``"module"``, ``"qkv"``, ``"layer"`` or a callable into a name -> group-key
    function.

    ``names``: the qualified names being adapted. ``"qkv"`` ties a block's ``up_proj`` and
    ``gate_proj`` only when both are among them (``None``: assume they are).
    """
    if callable(groups):
        return groups
    if groups == "module":
        return lambda name: name
    if groups == "qkv":
        return _paper_groups(None if names is None else set(names))
    if groups == "layer":
        # Every adapter inside one decoder block (the first numbered path component) shares
        # one rank variable; a module outside any block is its own group.
        def by_block(name: str) -> str:
            m = _BLOCK.match(name)
            return m.group(1) if m else name

        return by_block
    raise ValueError(f"groups must be 'module', 'qkv', 'layer' or a callable, got {groups!r}")


def _paper_groups(names: set[str] | None) -> Callable[[str], str]:
    """The paper's grouping (the authors' nncf_shears_llama.json and, when gate is adapted,
    nncf_shears_llama_with_gate_proj.json): Q, K and V of a block share one rank
    ("...self_attn.qkv_proj"); Up and Gate of a block share one ("...mlp.gate_up_proj", the
    name of the fused map in Phi-3) when both are adapted, else each stays alone; every
    other adapter (Down, O, ...) is its own group."""

    def key(name: str) -> str:
        if _QKV.search(name):
            return _QKV.sub("qkv_proj", name)
        m = _UP_GATE.search(name)
        if m is None:
            return name
        partner = name[: m.start()] + _PARTNER[m.group(1)]
        return name[: m.start()] + "gate_up_proj" if names is None or partner in names else name

    return key


def add_elastic_lora(
    model: nn.Module,
    target_modules: str | Sequence[str],
    ranks: Sequence[int] = (32, 24, 16),
    alpha: float = 64.0,
    dropout: float = 0.0,
    groups: GroupSpec = "module",
    sparse_adapter: bool = False,
    rank_mode: str = "slice",
) -> nn.Module:
    """Attach elastic LoRA super-adapters in place and freeze everything else.

    Args:
        model: any module, typically a (pruned) ``*ForCausalLM``.
        target_modules: name suffixes (``["q_proj", "k_proj", "v_proj", "up_proj",
            "down_proj"]``) or one regex over qualified names (``r".*\\.mlp\\..*"``).
        ranks: the elastic ranks of every adapter: positive integral values (Python or
            numpy ints, e.g. a numpy array; not floats), kept as descending plain ints.
        alpha: LoRA alpha, a finite number > 0; scaling ``alpha / max(ranks)`` for every
            active rank.
        dropout: dropout probability on the adapter input, in [0, 1).
        groups: which adapters share one rank variable: ``"module"`` (each its own),
            ``"qkv"`` (the paper's grouping: ``q_proj``, ``k_proj`` and ``v_proj`` of a
            block share one rank, so do ``up_proj`` and ``gate_proj`` when both are
            adapted, every other adapter is its own group), ``"layer"`` (one
            per decoder block) or a callable qualified-name -> group key.
        sparse_adapter: mask the update with the base weight's non-zeros (see
            ``ElasticLoRALinear``); True or False (numpy bools too), nothing else.
        rank_mode: ``"slice"`` (prefix views; the default) or ``"mask"`` (static shapes, so
            that ``torch.compile`` keeps one graph while the ranks change every step; see
            ``ElasticLoRALinear`` and docs/training.md).

    Returns:
        ``model`` itself, with only the adapters' ``lora_A``/``lora_B`` requiring grad. Its
        ``config`` (if it is a transformers config) records the adapters' layout as
        ``shears_super_adapter``, so that ``save_pretrained`` writes it to ``config.json``.
        The previous ``requires_grad`` of every parameter is kept on the model (attribute
        ``REQUIRES_GRAD_ATTR``) for ``merge_adapters`` to restore.
    """
    if any(isinstance(m, ElasticLoRALinear) for m in model.modules()):
        raise ValueError("elastic LoRA adapters are already applied to this model")
    ranks = validate_ranks(ranks)
    check_alpha_dropout(alpha, dropout)
    sparse_adapter = check_flag("sparse_adapter", sparse_adapter)
    if rank_mode not in RANK_MODES:
        raise ValueError(f"rank_mode must be one of {list(RANK_MODES)}, got {rank_mode!r}")
    names = match_targets(model, target_modules)
    group_fn = group_function(groups, names)
    plan = []
    for name in names:  # validate everything before swapping anything
        base = model.get_submodule(name)
        features = layer_features(base)  # not weight.shape: a 4-bit weight is packed
        if ranks[0] > min(features):
            raise ValueError(f"r_max={ranks[0]} exceeds min(in, out)={min(features)} of {name}")
        key = group_fn(name)
        if not isinstance(key, str):
            raise TypeError(f"group keys must be strings, got {key!r} for {name}")
        plan.append((name, base, key))
        if sparse_adapter:  # QA-SparsePEFT over a broken grid would train on NaN
            check_scales(name, base)
    # Backward of NLS goes through every 4-bit map, adapted or not (QLoRA-style base)
    quantized = [(n, m) for n, m in model.named_modules() if is_bnb_4bit(m)]
    for name, m in quantized:
        check_bnb_layer(m, name)
    for _, m in quantized:
        keep_trainable_layout(m)
    setattr(model, REQUIRES_GRAD_ATTR, {n: p.requires_grad for n, p in model.named_parameters()})
    model.requires_grad_(False)
    for name, base, key in plan:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = ElasticLoRALinear(base, ranks, alpha, dropout, sparse_adapter, group=key,
                                  rank_mode=rank_mode)
        setattr(parent, child, layer)
    record_adapter_metadata(model)  # replaces a stale layout from a reloaded checkpoint
    return model
