"""NLS under torch.compile: recompilations, graphs and throughput of sliced vs masked ranks.

    flock /tmp/shears-bench.lock python benchmarks/bench_compile.py --preset tiny --preset small

``NLSTrainer(torch_compile=True)`` (inductor, CPU) on a randomly initialised Llama, the
uniform sampler drawing a new configuration every step, against the same eager run:

* ``eager_slice``: eager, ``rank_mode="slice"`` (the baseline of every ratio);
* ``eager_mask``: eager, ``rank_mode="mask"``;
* ``compiled_slice``: compiled with sliced ranks (the trainer's switch to masks undone):
  each adapter's rank is a static int attribute to dynamo;
* ``compiled_slice_dynamic``: the same with ``allow_unspec_int_on_nn_module = True``, so
  that a changed rank becomes a symbolic size (the "bounded set of graphs" candidate);
* ``compiled_mask``: compiled with ``rank_mode="mask"`` (what ``NLSTrainer`` does).

Each side runs in a fresh subprocess with an empty inductor cache (cold compiles). Per
step: wall time and dynamo's frame counter. A step in which dynamo converted a frame is a
compiling step; throughput is tokens per step over the median of the other steps (the first
step of every side is left out), and compile time is the sum, over compiling steps, of their
excess over that median. Sides alternate over ``--repeats`` runs; the best is kept.
Recompilations are counted from dynamo's ``recompiles`` log, graphs and graph breaks from
``torch._dynamo.utils.counters``. The final adapter weights are compared with
``eager_slice``'s (same seed, same data, same configurations): the largest absolute
difference, the relative difference of all adapter weights (Frobenius), and the largest
difference of a step's loss. AdamW divides each gradient entry by its running RMS, so
rounding differences in small gradients are not damped over the steps; the relative
difference and the losses say more than the largest entry.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
SIDES = ["eager_slice", "eager_mask", "compiled_slice", "compiled_slice_dynamic",
         "compiled_mask"]
PRESETS = {  # Llama shapes; "tiny" is tests/tiny.py's
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                 batch=2, seqlen=32),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=1024,
                  batch=4, seqlen=128),
}


def _count_recompiles() -> list[int]:
    """Count dynamo's "Recompiling function" records (one per recompilation attempt)."""
    n = [0]

    class Counter(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Recompiling function"):
                n[0] += 1

    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(Counter())
    return n


def worker(opts: argparse.Namespace) -> dict:
    """One training run of side ``opts.worker``; returns its figures as a dict."""
    import transformers as T
    from safetensors.torch import save_file
    from torch._dynamo.utils import counters

    from shears.adapters import add_elastic_lora, elastic_modules
    from shears.training import NLSTrainer

    torch.set_num_threads(opts.threads)
    side, shape = opts.worker, dict(PRESETS[opts.preset[0]])
    batch, seqlen = shape.pop("batch"), shape.pop("seqlen")
    compiled = side.startswith("compiled")
    recompiles = _count_recompiles() if compiled else [0]
    if side == "compiled_slice_dynamic":
        torch._dynamo.config.allow_unspec_int_on_nn_module = True
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**shape))
    mode = "mask" if side.endswith("mask") else "slice"
    add_elastic_lora(model, TARGETS, ranks=[16, 8, 4], alpha=32.0, rank_mode=mode)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (opts.steps * batch, seqlen), generator=g)
    data = [{"input_ids": x, "labels": x.clone()} for x in ids]

    class StepClock(T.TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.frames: list[int] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0, self.f0 = time.perf_counter(), counters["frames"]["total"]

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)
            self.frames.append(counters["frames"]["total"] - self.f0)

    clock = StepClock()
    args = T.TrainingArguments(
        output_dir=opts.out, per_device_train_batch_size=batch, max_steps=opts.steps,
        learning_rate=1e-3, lr_scheduler_type="constant", report_to="none", use_cpu=True,
        save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, torch_compile=compiled,
        torch_compile_backend=opts.backend if compiled else None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the switch-to-masks warning; undone just below
        trainer = NLSTrainer(model=model, args=args, train_dataset=data, callbacks=[clock])
    if mode == "slice":
        for _, m in elastic_modules(model):
            m.rank_mode = "slice"
    trainer.train()

    steps = list(zip(clock.times, clock.frames, strict=True))  # (seconds, frames converted)
    steady = [t for i, (t, f) in enumerate(steps) if i and not f]
    median = statistics.median(steady)
    weights = Path(opts.out) / f"{side}.safetensors"
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()
               if "lora_" in n}, str(weights))
    return {
        "side": side,
        "tokens_per_s": batch * seqlen / median,
        "steady_steps": len(steady),
        "compiling_steps": sum(1 for f in clock.frames if f),
        "compile_s": sum(t - median for t, f in steps if f),
        "graphs": counters["stats"]["unique_graphs"],
        "frames": counters["frames"]["total"],
        "recompiles": recompiles[0],
        "limit_hits": sum(v for k, v in counters["unimplemented"].items()
                          if "recompile limit" in k.lower()),
        "graph_breaks": sum(counters["graph_break"].values()),
        "configs": [r["config"] for r in trainer.nls_history.records],
        "losses": [r["loss"] for r in trainer.nls_history.records],
        "weights": str(weights),
    }


def run_side(side: str, preset: str, opts: argparse.Namespace, out: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--preset", preset, "--steps",
           str(opts.steps), "--threads", str(opts.threads), "--backend", opts.backend,
           "--out", out]
    with tempfile.TemporaryDirectory() as cache:  # cold compiles: nothing cached before
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} ({preset}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(preset: str, runs: dict[str, list[dict]], opts: argparse.Namespace) -> None:
    """A markdown table; ratios and weight differences against ``eager_slice``.

    Throughput and compile time: the best of the repeats (CPU time on shared cores is noisy);
    the counts are those of the first run (they are deterministic).
    """
    from safetensors.torch import load_file

    base = runs["eager_slice"][0]
    best_base = max(r["tokens_per_s"] for r in runs["eager_slice"])
    ref = load_file(base["weights"])
    print(f"\n{preset}: {opts.steps} NLS steps, {PRESETS[preset]}, {opts.threads} thread(s), "
          f"backend {opts.backend}, best of {opts.repeats}")
    print("| side | recompiles | graphs | frames | limit hits | graph breaks | compiling steps |"
          " compile s | tokens/s (all runs) | vs eager_slice | max abs weight diff |"
          " relative weight diff | max loss diff |")
    print("|" + " --- |" * 13)
    for side, rs in runs.items():
        r, best = rs[0], max(x["tokens_per_s"] for x in rs)
        w = load_file(r["weights"])
        diff = max((w[n] - ref[n]).abs().max().item() for n in ref)
        rel = (sum((w[n] - ref[n]).square().sum() for n in ref)
               / sum(ref[n].square().sum() for n in ref)).sqrt().item()
        loss = max(abs(a - b) for a, b in zip(r["losses"], base["losses"], strict=True))
        same = r["configs"] == base["configs"]
        every = ", ".join(f"{x['tokens_per_s']:.0f}" for x in rs)
        print(f"| {side} | {r['recompiles']} | {r['graphs']} | {r['frames']} | "
              f"{r['limit_hits']} | {r['graph_breaks']} | {r['compiling_steps']} | "
              f"{min(x['compile_s'] for x in rs):.1f} | {best:.0f} ({every}) | "
              f"{best / best_base:.2f} | {diff:.1e} | {rel:.1e} | {loss:.1e}"
              f"{'' if same else ' (other configs!)'} |")
    n = len({tuple(c.values()) for c in base["configs"]})
    print(f"\n{n} distinct configurations in {opts.steps} steps")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", action="append", choices=PRESETS,
                   help="model shapes (repeatable); default: tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--repeats", type=int, default=2, help="runs per side, alternating")
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend of the compiled sides (aot_eager: quick check)")
    p.add_argument("--side", action="append", choices=SIDES, help="default: all")
    p.add_argument("--out", default="/tmp/shears-bench-compile")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        print(json.dumps(worker(opts)))
        return
    sides = [s for s in SIDES if s == "eager_slice" or s in (opts.side or SIDES)]
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    for preset in opts.preset or ["tiny"]:
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for i in range(opts.repeats):
            for side in sides:  # alternate, so that drifting load hits every side alike
                out = str(Path(opts.out) / preset / str(i))
                runs[side].append(r := run_side(side, preset, opts, out))
                print(f"[{i}] {preset} {side}: {r['tokens_per_s']:.0f} tok/s, "
                      f"{r['recompiles']} recompiles, compile {r['compile_s']:.1f} s",
                      file=sys.stderr)
        print(f"load average after {preset}: {os.getloadavg()}", file=sys.stderr)
        report(preset, runs, opts)


if __name__ == "__main__":
    main()
