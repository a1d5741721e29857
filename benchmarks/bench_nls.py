"""NLS super-adapter training against PEFT LoRA r=32 on SmolLM2-135M, in one run.

    flock /tmp/shears-bench.lock python benchmarks/bench_nls.py --data ../shared/data

Both sides: targets Q, K, V, Up, Down; alpha 64; the same ``TrainingArguments`` (fp32,
AdamW, lr 3e-4, batch x seqlen tokens per step, no checkpoints) and the same WikiText-2
windows in the same order. ``nls``: ``NLSTrainer`` over ranks [32, 24, 16] (uniform
sampler); ``peft``: ``Trainer`` over a PEFT ``LoraConfig(r=32, lora_alpha=64)`` model.

Each training runs in a fresh subprocess so that its peak memory is its own. Throughput:
runs alternate (peft, nls, nls_max, peft, ...), the best of ``--repeats`` is kept per side,
and the first (warm-up) step is not counted. Peak memory: one more short run per side,
the process's peak resident set during ``train()`` (``VmHWM`` reset once the model is
loaded), with glibc told to return large blocks on free so that the figure follows live
tensors rather than heap fragmentation; ``torch.cuda.max_memory_allocated`` on a GPU.
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
from transformers import Trainer, TrainerCallback, TrainingArguments

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
SIDES = {"peft": "PEFT LoRA r=32 + Trainer", "nls": "NLSTrainer [32,24,16] uniform",
         "nls_max": "NLSTrainer, maximal sub-adapter every step"}


class StepTimer(TrainerCallback):
    """Wall-clock time at the end of every optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if args.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


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


def windows(data: str, tok, n: int, seqlen: int) -> list[dict]:
    from shears.evaluation.perplexity import wikitext2_ids

    ids = wikitext2_ids(tok, data)[: n * seqlen].view(n, seqlen)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def worker(opts: argparse.Namespace) -> dict:
    """One training run of ``opts.worker`` ("nls" or "peft"); returns its figures."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from smollm2 import load_smollm2  # the examples' model loader

    torch.manual_seed(0)
    model, tok = load_smollm2()
    data = windows(opts.data, tok, opts.steps * opts.batch, opts.seqlen)
    args = TrainingArguments(
        output_dir=opts.out, per_device_train_batch_size=opts.batch, max_steps=opts.steps,
        learning_rate=3e-4, weight_decay=0.0, lr_scheduler_type="constant", report_to="none",
        save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0,
        use_cpu=opts.device == "cpu", dataloader_num_workers=0,
    )
    timer = StepTimer()
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
    tokens = (len(t) - 1) * opts.batch * opts.seqlen  # the first step is warm-up
    result = {
        "side": opts.worker,
        "tokens_per_s": tokens / (t[-1] - t[0]),
        "peak_bytes": peak,
        "peak_above_start_bytes": peak - base,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if opts.worker != "peft":
        ranks = [r for rec in trainer.nls_history.records for r in rec["config"].values()]
        result["mean_rank"] = sum(ranks) / len(ranks)
    return result


def run_side(side: str, opts: argparse.Namespace, memory: bool = False) -> dict:
    steps = opts.memory_steps if memory else opts.steps
    cmd = [sys.executable, __file__, "--worker", side, "--data", opts.data, "--steps",
           str(steps), "--batch", str(opts.batch), "--seqlen", str(opts.seqlen),
           "--device", opts.device, "--out", opts.out]
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
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--steps", type=int, default=11, help="optimizer steps (first = warm-up)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=3, help="steps of the memory runs")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="/tmp/shears-bench-nls")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        print(json.dumps(worker(opts)))
        return
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for i in range(opts.repeats):
        for side in SIDES:  # alternate, so that drifting load hits every side alike
            runs[side].append(run_side(side, opts))
            r = runs[side][-1]
            print(f"[{i}] {side}: {r['tokens_per_s']:.1f} tok/s, peak "
                  f"{r['peak_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    mem = {side: run_side(side, opts, memory=True) for side in SIDES} if opts.device == "cpu" \
        else {side: min(rs, key=lambda r: r["peak_bytes"]) for side, rs in runs.items()}
    report(runs, mem, opts)


def report(runs: dict[str, list[dict]], mem: dict[str, dict], opts: argparse.Namespace) -> None:
    """A markdown table plus the ratios against the PEFT baseline of the same run."""
    best = {s: max(r["tokens_per_s"] for r in rs) for s, rs in runs.items()}
    peak = {s: m["peak_bytes"] for s, m in mem.items()}
    above = {s: m["peak_above_start_bytes"] for s, m in mem.items()}
    mib = 2**20
    print(f"| side | tokens/s (best of {opts.repeats}) | all runs | throughput ratio | peak MiB |"
          " peak ratio | peak above start MiB | trainable params |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for s, label in SIDES.items():
        all_tps = ", ".join(f"{r['tokens_per_s']:.1f}" for r in runs[s])
        print(f"| {label} | {best[s]:.1f} | {all_tps} | {best[s] / best['peft']:.3f} | "
              f"{peak[s] / mib:.0f} | {peak[s] / peak['peft']:.3f} | {above[s] / mib:.0f} | "
              f"{runs[s][0]['trainable']:,} |")
    print(f"\nNLS mean sampled rank {runs['nls'][0]['mean_rank']:.1f}; {opts.steps} steps "
          f"(first = warm-up) of {opts.batch} x {opts.seqlen} tokens, device {opts.device}; "
          f"peak memory from separate {opts.memory_steps}-step runs")


if __name__ == "__main__":
    main()
