"""vLLM serves shears' exports as transformers runs them (the vLLM environment's half).

    VENV/bin/python benchmarks/vllm_check.py DIR [--json result.json] [--part a|b]
                                                 [--lora-dtype float32|bfloat16|both]

``DIR`` is what ``benchmarks/vllm_prepare.py`` wrote (main env). This script imports only what
the vLLM environment has (vllm, torch; no shears) and checks:

(a) ``DIR/int4`` (``export_compressed``, W4A16) served by vLLM in bf16 (its CPU W4A16 kernel
    takes bf16 activations): per-token log-probabilities of the WikiText-2 windows from
    ``prompt_logprobs``, against transformers' on the same file. "bf16 noise" is what bf16
    costs transformers itself on the same windows: ``noise_ppl`` = |ln ppl_tf_bf16 -
    ln ppl_tf_fp32| and ``noise_rms`` = RMS over tokens of (logprob_tf_bf16 -
    logprob_tf_fp32). Passes when vLLM's |ln ppl - ln ppl_tf_fp32| <= 2 noise_ppl +
    0.002 (a 0.2% floor: the bf16 shift can land near 0 by cancellation) and its RMS
    against fp32 <= 2 noise_rms.
(b) ``DIR/peft`` (``export_peft``) served as a LoRA over ``DIR/pruned`` (``enable_lora``,
    ``max_lora_rank``, ``LoRARequest``): greedy tokens (``temperature=0``, ``ignore_eos``)
    with and without the adapter, against transformers' and transformers + PEFT's on prompts
    where the adapter changes the greedy output (vllm_prepare.py kept only those, and this
    script asserts again that vLLM's base and adapted outputs differ). Exact equality is
    required in fp32; bf16 agreement is counted and reported (a bf16 near-tie may flip).

Exit status 0 when every check passes, 1 otherwise; ``--json`` gets the figures either way.
Environment it sets unless already set (docs/deploy.md): ``VLLM_TARGET_DEVICE=cpu``,
``VLLM_CPU_KVCACHE_SPACE=1`` (GiB), ``VLLM_CPU_INT4_W4A8=0`` (on AMX CPUs vLLM would otherwise
quantize the activations to int8 too: W4A8, not the W4A16 we check).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
from pathlib import Path

for key, value in {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1",
                   "VLLM_CPU_INT4_W4A8": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
    os.environ.setdefault(key, value)


def engine(model: Path, dtype: str, max_len: int, **kwargs):
    """A vLLM ``LLM`` on the CPU: eager (no graph capture), token ids in and out."""
    from vllm import LLM

    return LLM(model=str(model), dtype=dtype, max_model_len=max_len, enforce_eager=True,
               seed=0, max_num_seqs=8, distributed_executor_backend="uni", **kwargs)


def close(llm) -> None:
    """Shut the engine (its worker process) down before the next one starts."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def vllm_logprobs(llm, windows: list[list[int]]) -> list[list[float]]:
    """vLLM's log p(token t | tokens < t), t = 1..seqlen-1, from ``prompt_logprobs``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params,
                        use_tqdm=False)
    # position 0 has no prediction (None); each later one holds the prompt token's logprob
    return [[o.prompt_logprobs[t][w[t]].logprob for t in range(1, len(w))]
            for o, w in zip(outs, windows, strict=True)]


def log_ppl(rows: list[list[float]]) -> float:
    return -sum(map(sum, rows)) / sum(map(len, rows))


def rms(a: list[list[float]], b: list[list[float]]) -> float:
    d = [(x - y) ** 2 for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return math.sqrt(sum(d) / len(d))


def check_int4(d: Path, ref: dict) -> dict:
    """(a): vLLM's perplexity of ``int4/`` against transformers' fp32, within bf16 noise."""
    windows = ref["windows"]
    llm = engine(d / "int4", "bfloat16", len(windows[0]) + 1)
    got = vllm_logprobs(llm, windows)
    close(llm)
    fp32, bf16 = ref["logprobs"]["float32"], ref["logprobs"]["bfloat16"]
    r = {"ppl_transformers_fp32": math.exp(log_ppl(fp32)),
         "ppl_transformers_bf16": math.exp(log_ppl(bf16)), "ppl_vllm_bf16": math.exp(log_ppl(got)),
         "noise_ppl": abs(log_ppl(bf16) - log_ppl(fp32)), "noise_rms": rms(bf16, fp32),
         "vllm_ppl_shift": abs(log_ppl(got) - log_ppl(fp32)), "vllm_rms": rms(got, fp32),
         "windows": len(windows), "tokens": sum(map(len, got)), "vllm_logprobs": got}
    r["ok"] = (r["vllm_ppl_shift"] <= 2 * r["noise_ppl"] + 0.002
               and r["vllm_rms"] <= 2 * r["noise_rms"])
    return r


def greedy(llm, prompts: list[list[int]], n: int, lora=None) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        lora_request=lora, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def check_lora(d: Path, ref: dict, dtype: str) -> dict:
    """(b): greedy tokens of the pruned base and of base + LoRA against transformers."""
    from vllm.lora.request import LoRARequest

    rows, n = ref["greedy"], ref["new_tokens"]
    prompts = [r["prompt"] for r in rows]
    max_len = max(map(len, prompts)) + n
    llm = engine(d / "pruned", dtype, max_len, enable_lora=True, max_loras=1,
                 max_lora_rank=ref["max_lora_rank"])
    base = greedy(llm, prompts, n)
    lora = greedy(llm, prompts, n, LoRARequest("sub-adapter", 1, str(d / "peft")))
    close(llm)
    r = {"dtype": dtype, "prompts": len(rows), "new_tokens": n,
         "base_equal": sum(b == x[f"base_{dtype}"] for b, x in zip(base, rows, strict=True)),
         "lora_equal": sum(a == x[f"lora_{dtype}"] for a, x in zip(lora, rows, strict=True)),
         "adapter_changes_output": sum(a != b for a, b in zip(lora, base, strict=True)),
         "base_tokens": base, "lora_tokens": lora}
    r["ok"] = r["adapter_changes_output"] == len(rows) and (
        dtype != "float32" or r["base_equal"] == r["lora_equal"] == len(rows))
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="vLLM against transformers on shears' exports")
    p.add_argument("dir", help="what benchmarks/vllm_prepare.py wrote")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--part", choices=["a", "b", "all"], default="all")
    p.add_argument("--lora-dtype", choices=["float32", "bfloat16", "both"], default="both",
                   help="(b): the dtypes vLLM serves the LoRA in")
    args = p.parse_args(argv)
    d = Path(args.dir)
    ref = json.loads((d / "reference.json").read_text())
    result = {"vllm": __import__("vllm").__version__}
    if args.part in ("a", "all"):
        result["int4"] = check_int4(d, ref)
    if args.part in ("b", "all"):
        dtypes = ("float32", "bfloat16") if args.lora_dtype == "both" else (args.lora_dtype,)
        result["lora"] = {t: check_lora(d, ref, t) for t in dtypes}
    checks = [result["int4"]] if "int4" in result else []
    checks += list(result.get("lora", {}).values())
    result["ok"] = all(c["ok"] for c in checks)
    text = json.dumps(result, indent=1)
    if args.json:  # atomic (shears' rule), without importing shears
        with tempfile.NamedTemporaryFile("w", dir=Path(args.json).parent, delete=False) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f.name, args.json)
    raw = ("vllm_logprobs", "base_tokens", "lora_tokens")  # in --json only
    summary = {k: v for k, v in result.items() if k not in ("int4", "lora")}
    if "int4" in result:
        summary["int4"] = {k: v for k, v in result["int4"].items() if k not in raw}
    summary["lora"] = {t: {k: v for k, v in c.items() if k not in raw}
                       for t, c in result.get("lora", {}).items()}
    print(json.dumps(summary, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
