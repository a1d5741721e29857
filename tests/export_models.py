"""Wanda-pruned tiny models carrying trained-looking elastic adapters, for the export tests."""

from __future__ import annotations

import copy
import re

import torch
import transformers as T
from tiny import _GQA, VOCAB, make_tiny, random_ids, randomize_adapters

from shears import add_elastic_lora, wanda_prune

TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],
}


def paper_groups(family: str):
    """Q, K, V of a block share one rank (Shears); GPT-2: one group per target per block,
    so the attention and MLP ``c_proj`` of a block share a rank (maps of different shapes)."""
    if family == "gpt2":
        return lambda name: re.sub(r"\.(attn|mlp)\.(c_\w+)$", r".\2", name)
    return "qkv"


def make_base(family: str, layers: int | None = None, dtype=torch.float32):
    """A tiny model of ``family`` (``layers`` decoder blocks for Llama), in eval mode."""
    if layers is None:
        return make_tiny(family, dtype=dtype)
    config = T.LlamaConfig(**dict(_GQA, num_hidden_layers=layers), vocab_size=VOCAB)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def pruned_adapted(family: str = "llama", *, layers: int | None = None, ranks=(16, 8, 4),
                   alpha: float = 32.0, sparse_adapter: bool = False, dtype=torch.float32,
                   seed: int = 0):
    """``(pruned_base, model)``: a Wanda-50% tiny model (random calibration ids), a deep copy
    of it without adapters, and the model with paper-grouped elastic adapters whose A and B
    hold random values (B is zero at init, which would make every check vacuous)."""
    model = make_base(family, layers, dtype)
    wanda_prune(model, random_ids(4, 16, seed=7), 0.5, progress=False)
    base = copy.deepcopy(model)
    add_elastic_lora(model, TARGETS[family], ranks=ranks, alpha=alpha,
                     groups=paper_groups(family), sparse_adapter=sparse_adapter)
    randomize_adapters(model, seed=seed, a_scale=0.2, b_scale=0.2)
    return base, model


def state(model) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict, cloned, to compare a model bitwise before and after."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(random_ids(2, 12) if ids is None else ids).logits.float()
