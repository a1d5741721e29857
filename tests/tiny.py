"""Tiny randomly initialised causal LMs, one per architecture family, for fast unit tests."""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 128
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
_GQA = dict(_COMMON, num_key_value_heads=2)

CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_GQA),
    "mistral": lambda: T.MistralConfig(**_GQA),
    "qwen2": lambda: T.Qwen2Config(**_GQA),
    "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                 bos_token_id=0, eos_token_id=0),
    "opt": lambda: T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                               num_attention_heads=4, word_embed_proj_dim=64,
                               max_position_embeddings=256),
    "gpt_neox": lambda: T.GPTNeoXConfig(**_COMMON, max_position_embeddings=256),
    "phi3": lambda: T.Phi3Config(**_GQA, pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
FAMILIES = list(CONFIGS)


def make_tiny(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny ``*ForCausalLM`` of ``family`` with seeded random weights, in eval mode."""
    config = CONFIGS[family]()
    config.vocab_size = VOCAB
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def random_ids(n: int = 4, seqlen: int = 32, seed: int = 0) -> torch.LongTensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)


def randomize_adapters(model, seed: int = 0, a_scale: float | None = 1.0,
                       b_scale: float = 0.1):
    """Give every elastic adapter random A (scaled, or left alone if ``a_scale`` is None) and
    B, as after training: B starts at zero, so an untrained adapter would test nothing.
    Draws A then B module by module from one seeded generator."""
    from shears.adapters import elastic_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in elastic_modules(model):
            if a_scale is not None:
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * a_scale)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * b_scale)
    return model
