"""NLS super-adapter training against PEFT LoRA r=32, in one run.

    flock /tmp/shears-bench.lock python benchmarks/bench_nls.py --data ../shared/data
    python benchmarks/bench_nls.py --model random-1b --device cuda --batch 8 --seqlen 512 \
        --steps 30 --warmup 5 --json nls_1b.json

Both sides: targets Q, K, V, Up, Down; alpha 64; the same ``TrainingArguments`` (AdamW,
lr 3e-4, batch x seqlen tokens per step, no checkpoints, bf16 autocast over a bf16 base)
and the same
token windows in the same order. ``nls``: ``NLSTrainer`` over ranks [32, 24, 16] (uniform
sampler); ``peft``: ``Trainer`` over a PEFT ``LoraConfig(r=32, lora_alpha=64)`` model;
``nls_max``: ``NLSTrainer`` held at the maximal sub-adapter (PEFT's maths).

``--base nf4`` (QLoRA-style): the three sides train over the same bitsandbytes NF4 base
(``from_pretrained`` with ``BitsAndBytesConfig(load_in_4bit=True, nf4)``, compute dtype =
the base dtype; a random preset is saved once under ``--out`` to be reloaded so), and a
fourth side, ``nls_unquantized``, is NLS over the unquantized base of the same run: the
cost of NF4 itself. ``nls_unquantized`` is the ratios' second baseline.

Models: ``smollm2`` (SmolLM2-135M-Instruct on WikiText-2 windows, the default) or a random
Llama of real shapes on random token ids (``random-tiny``, ``random-1b``, ``random-7b``; see
``random_llama.py``), which needs no download and no ``datasets``. The base is bf16 on CUDA
and fp32 on CPU unless ``--dtype`` says otherwise; adapters are fp32 on both sides.

Each training runs in a fresh subprocess so that its peak memory is its own. Throughput:
runs alternate (peft, nls, nls_max, peft, ...), the best of ``--repeats`` is kept per side,
and the clock runs from the end of step ``--warmup`` to the end of the last step, with the
device synchronised at those two points only (a host that stays ahead of the GPU is
measured as such). ``logging_nan_inf_filter`` is off on every side: the Trainer's NaN check
would otherwise synchronise host and device at every micro-batch. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` during ``train()`` (after ``reset_peak_memory_stats``
once the model is on the device), from the throughput runs; on CPU one more short run per
side, the process's peak resident set during ``train()`` (``VmHWM`` reset once the model is
loaded), with glibc told to return large blocks on free so that the figure follows live
tensors rather than heap fragmentation (``--memory-steps 0``: from the throughput runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from random_llama import PRESETS, random_ids, random_llama, resolve_dtype
from transformers import Trainer, TrainerCallback, TrainingArguments

from shears.quantization.bnb import is_bnb_4bit

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
SIDES = {"peft": "PEFT LoRA r=32 + Trainer", "nls": "NLSTrainer [32,24,16] uniform",
         "nls_max": "NLSTrainer, maximal sub-adapter every step"}
UNQUANTIZED = {"nls_unquantized": "NLSTrainer [32,24,16] uniform, unquantized base"}


def sides(opts: argparse.Namespace) -> dict[str, str]:
    """The runs of this benchmark: over an NF4 base, one more over the unquantized base."""
    if opts.base == "nf4":
        return {s: f"{label}, NF4 base" for s, label in SIDES.items()} | UNQUANTIZED
    return SIDES


class StepTimer(TrainerCallback):
    """Wall-clock time at the end of optimizer step ``start`` and of the last step, each
    taken once the device has finished; nothing synchronises in between."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.times: dict[int, float] = {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.start, state.max_steps):
            if args.device.type == "cuda":
                torch.cuda.synchronize()
            self.times[state.global_step] = time.perf_counter()


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak(device: str) -> int:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    return _status("VmRSS")


def _peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else _status("VmHWM")


def windows(data: str, tok, n: int, seqlen: int) -> torch.Tensor:
    from shears.evaluation.perplexity import wikitext2_ids

    return wikitext2_ids(tok, data)[: n * seqlen].view(n, seqlen)


def checkpoint(opts: argparse.Namespace) -> Path:
    """The base's checkpoint directory, for a 4-bit reload; a random preset's is written
    (once, under ``--out``) by ``main``."""
    if opts.model in PRESETS:
        return Path(opts.out) / f"{opts.model}-{opts.blocks or 'all'}-{opts.dtype}"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from smollm2 import smollm2_checkpoint

    return smollm2_checkpoint()


def nf4_model(opts: argparse.Namespace, dtype: torch.dtype) -> torch.nn.Module:
    """The base reloaded as bitsandbytes NF4 (every linear map but lm_head), as QLoRA does."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(checkpoint(opts), quantization_config=q,
                                                dtype=dtype, device_map=opts.device).eval()


def model_and_data(opts: argparse.Namespace, nf4: bool = False):
    """The base model (on ``opts.device``; bitsandbytes NF4 if ``nf4``) and ``steps x batch``
    training windows."""
    n = opts.steps * opts.batch
    dtype = resolve_dtype(opts.dtype, opts.device)
    if opts.model in PRESETS:
        model = nf4_model(opts, dtype) if nf4 else \
            random_llama(opts.model, opts.blocks, device=opts.device, dtype=dtype)
        ids = random_ids(n, opts.seqlen, model.config.vocab_size)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
        from smollm2 import load_smollm2  # the examples' model loader
        from transformers import AutoTokenizer

        if nf4:
            model, tok = nf4_model(opts, dtype), AutoTokenizer.from_pretrained(checkpoint(opts))
        else:
            model, tok = load_smollm2(dtype=dtype)
        if opts.blocks is not None:
            model.model.layers = model.model.layers[: opts.blocks]
            model.config.num_hidden_layers = opts.blocks
        ids = windows(opts.data, tok, n, opts.seqlen)
    return model, [{"input_ids": x, "labels": x.clone()} for x in ids]


def worker(opts: argparse.Namespace) -> dict:
    """One training run of ``opts.worker`` (a key of ``SIDES``); returns its figures."""
    torch.manual_seed(0)
    model, data = model_and_data(opts, nf4=opts.base == "nf4" and opts.worker in SIDES)
    cuda = opts.device == "cuda"
    args = TrainingArguments(
        output_dir=opts.out, per_device_train_batch_size=opts.batch, max_steps=opts.steps,
        learning_rate=3e-4, weight_decay=0.0, lr_scheduler_type="constant", report_to="none",
        save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0,
        use_cpu=not cuda, bf16=resolve_dtype(opts.dtype, opts.device) == torch.bfloat16,
        dataloader_num_workers=0, logging_nan_inf_filter=False,
    )
    timer = StepTimer(opts.warmup)
    if opts.worker == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0,
                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
    else:
        from shears.adapters import add_elastic_lora, maximal_config
        from shears.training import NLSTrainer

        add_elastic_lora(model, TARGETS, ranks=[32, 24, 16], alpha=64.0)
        # nls_max: always the maximal sub-adapter, i.e. the same maths as PEFT r=32, so the
        # ratio isolates what the NLS machinery itself costs.
        sampler = "uniform" if opts.worker == "nls" else (lambda sp, rng, st: maximal_config(sp))
        trainer = NLSTrainer(model=model, args=args, train_dataset=data, callbacks=[timer],
                             nls_sampler=sampler)
    base = _reset_peak(opts.device)
    trainer.train()
    peak = _peak(opts.device)
    t = timer.times
    tokens = (opts.steps - opts.warmup) * opts.batch * opts.seqlen  # warm-up steps not counted
    result = {
        "side": opts.worker,
        "tokens_per_s": tokens / (t[opts.steps] - t[opts.warmup]),
        "peak_bytes": peak,
        "peak_above_start_bytes": peak - base,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "base_dtype": str(next(p for p in model.parameters() if not p.requires_grad).dtype),
        "nf4_maps": sum(is_bnb_4bit(m) for m in model.modules()),
    }
    if opts.worker != "peft":
        ranks = [r for rec in trainer.nls_history.records for r in rec["config"].values()]
        result["mean_rank"] = sum(ranks) / len(ranks)
    return result


def run_side(side: str, opts: argparse.Namespace, memory: bool = False) -> dict:
    steps = opts.memory_steps if memory else opts.steps
    if opts.inline:  # the CI's smoke test: no interpreter start per side
        return worker(argparse.Namespace(**{**vars(opts), "worker": side, "steps": steps}))
    cmd = [sys.executable, __file__, "--worker", side, "--data", opts.data, "--steps",
           str(steps), "--batch", str(opts.batch), "--seqlen", str(opts.seqlen),
           "--device", opts.device, "--out", opts.out, "--model", opts.model,
           "--dtype", opts.dtype, "--warmup", str(min(opts.warmup, steps - 1)),
           "--base", opts.base]
    if opts.blocks is not None:
        cmd += ["--blocks", str(opts.blocks)]
    env = dict(os.environ)
    if memory:
        # glibc otherwise keeps freed blocks mapped, so peak RSS depends on heap
        # fragmentation (runs of one side differed by 10%); with these, large blocks are
        # mmapped and returned on free, and the peak resident set follows the peak of live
        # tensors. It slows every allocation, hence separate runs for the memory figure.
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", *PRESETS])
    p.add_argument("--blocks", type=int, default=None, help="keep the first N decoder blocks")
    p.add_argument("--data", default="../shared/data", help="WikiText-2 folder (smollm2)")
    p.add_argument("--steps", type=int, default=11, help="optimizer steps, warm-up included")
    p.add_argument("--warmup", type=int, default=1, help="first steps not timed")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=3,
                   help="steps of the CPU memory runs (0: peak RSS of the throughput runs)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="base weights; auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--base", default="full", choices=["full", "nf4"],
                   help="nf4: every side over a bitsandbytes NF4 base, plus nls_unquantized")
    p.add_argument("--out", default="/tmp/shears-bench-nls")
    p.add_argument("--json", default=None, help="also write every run and the ratios here")
    p.add_argument("--inline", action="store_true",
                   help="run every side in this process (quick; peak memory not per side)")
    p.add_argument("--worker", choices=SIDES | UNQUANTIZED, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        print(json.dumps(worker(opts)))
        return
    if not 0 < opts.warmup < opts.steps:
        p.error("need 0 < --warmup < --steps: the clock starts at the end of step --warmup")
    if opts.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    if opts.base == "nf4" and opts.model in PRESETS and not checkpoint(opts).exists():
        dtype = resolve_dtype(opts.dtype, opts.device)  # saved once, reloaded 4-bit per side
        random_llama(opts.model, opts.blocks, device=opts.device, dtype=dtype
                     ).save_pretrained(checkpoint(opts))
    runs: dict[str, list[dict]] = {side: [] for side in sides(opts)}
    for i in range(opts.repeats):
        for side in sides(opts):  # alternate, so that drifting load hits every side alike
            runs[side].append(run_side(side, opts))
            r = runs[side][-1]
            print(f"[{i}] {side}: {r['tokens_per_s']:.1f} tok/s, peak "
                  f"{r['peak_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    if opts.device == "cpu" and opts.memory_steps > 0:
        mem = {side: run_side(side, opts, memory=True) for side in sides(opts)}
    else:
        mem = {side: min(rs, key=lambda r: r["peak_bytes"]) for side, rs in runs.items()}
    summary = report(runs, mem, opts)
    if opts.json:
        Path(opts.json).write_text(json.dumps(summary, indent=2))


def environment(device: str) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        pass
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env["torch_threads"] = torch.get_num_threads()
    return env


def report(runs: dict[str, list[dict]], mem: dict[str, dict], opts: argparse.Namespace) -> dict:
    """A markdown table plus the ratios against the PEFT baseline of the same run."""
    best = {s: max(r["tokens_per_s"] for r in rs) for s, rs in runs.items()}
    peak = {s: m["peak_bytes"] for s, m in mem.items()}
    above = {s: m["peak_above_start_bytes"] for s, m in mem.items()}
    mib = 2**20
    print(f"| side | tokens/s (best of {opts.repeats}) | all runs | throughput ratio | peak MiB |"
          " peak ratio | peak above start MiB | trainable params |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for s, label in sides(opts).items():
        all_tps = ", ".join(f"{r['tokens_per_s']:.1f}" for r in runs[s])
        print(f"| {label} | {best[s]:.1f} | {all_tps} | {best[s] / best['peft']:.3f} | "
              f"{peak[s] / mib:.0f} | {peak[s] / peak['peft']:.3f} | {above[s] / mib:.0f} | "
              f"{runs[s][0]['trainable']:,} |")
    print(f"\n{opts.model} ({runs['peft'][0]['base_dtype']} base, {opts.blocks or 'all'} "
          f"blocks); NLS mean sampled rank {runs['nls'][0]['mean_rank']:.1f}; {opts.steps} "
          f"steps ({opts.warmup} warm-up) of {opts.batch} x {opts.seqlen} tokens, device "
          f"{opts.device}; peak memory " + ("from separate "
          f"{opts.memory_steps}-step runs" if opts.device == "cpu" and opts.memory_steps > 0
          else "from the throughput runs"))
    summary = {
        "settings": {k: v for k, v in vars(opts).items() if k != "worker"},
        "environment": environment(opts.device),
        "runs": runs,
        "memory_runs": mem,
        "throughput_ratio": {s: best[s] / best["peft"] for s in runs},
        "peak_ratio": {s: peak[s] / peak["peft"] for s in runs},
        "peak_above_start_ratio": {s: above[s] / above["peft"] if above["peft"] else None
                                   for s in runs},
    }
    if "nls_unquantized" in runs:  # the cost of the NF4 base itself, NLS against NLS
        u = "nls_unquantized"
        summary["nf4_vs_unquantized"] = {
            "throughput_ratio": best["nls"] / best[u], "step_time_ratio": best[u] / best["nls"],
            "peak_ratio": peak["nls"] / peak[u]}
        print("NLS over NF4 / NLS over the unquantized base: throughput "
              f"{best['nls'] / best[u]:.3f}, step time {best[u] / best['nls']:.3f}, peak memory "
              f"{peak['nls'] / peak[u]:.3f}")
    return summary


if __name__ == "__main__":
    main()
