"""Randomly initialised Llama models with real shapes, so that benchmarks need no download.

Timing and memory depend on shapes, not on trained weights, so ``--model random-1b`` or
``--model random-7b`` measures on any GPU machine what the real model would cost; token ids
are random too. ``random-tiny`` is the preset the CI runs the benchmarks with on CPU.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# hidden, intermediate, blocks, heads, KV heads, vocab. random-1b: TinyLlama-1.1B's block
# shapes (grouped-query attention) with 16 blocks instead of 22, 836M parameters (issue 9's
# GPU measurement); random-7b: Llama-2-7B's shapes, 6.74B parameters.
PRESETS: dict[str, dict[str, int]] = {
    "random-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
    "random-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "random-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}


def default_dtype(device: str) -> torch.dtype:
    """bf16 on a GPU (how such models are trained and pruned there), fp32 on CPU."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``"auto"`` (see ``default_dtype``), ``"float32"`` or ``"bfloat16"``."""
    return default_dtype(device) if name == "auto" else getattr(torch, name)


def random_llama(name: str, blocks: int | None = None, device: str = "cpu",
                 dtype: torch.dtype | None = None, seed: int = 0) -> LlamaForCausalLM:
    """A seeded random ``LlamaForCausalLM`` of preset ``name`` on ``device``, in eval mode.

    ``blocks`` keeps only the first N decoder blocks. The weights are created directly on
    the device in ``dtype`` (a 7B model would take minutes to initialise on CPU).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {list(PRESETS)}")
    config = LlamaConfig(**PRESETS[name], max_position_embeddings=4096, use_cache=False)
    if blocks is not None:
        if not 0 < blocks <= config.num_hidden_layers:
            raise ValueError(f"--blocks must be in 1..{config.num_hidden_layers}, got {blocks}")
        config.num_hidden_layers = blocks
    dtype = dtype or default_dtype(device)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are born in dtype: no fp32 copy of 7B
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device).eval()  # no dtype cast: inv_freq stays fp32, as from_pretrained does


def random_ids(n: int, seqlen: int, vocab: int, seed: int = 0) -> torch.LongTensor:
    """(n, seqlen) token ids drawn uniformly on CPU with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)
