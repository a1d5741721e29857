"""NLS on FSDP2-sharded elastic adapters, two CPU processes (gloo), against one process.

    torchrun --standalone --nproc_per_node 2 benchmarks/check_nls_fsdp.py --out DIR [--steps 6]

1. ``slicing``: ``fully_shard`` on each decoder block and on the root of a tiny Llama whose
   q/v/up/down maps carry elastic adapters (frozen base and trainable ``lora_A``/``lora_B``
   in one FSDP unit), with ``reshard_after_forward`` True and False, and once with a bf16
   base under fp32 adapters. Inside forward each adapter must see its whole (r_max, in)
   ``lora_A`` as a plain tensor (FSDP2 all-gathers before the block's forward), the
   parameters between steps must be DTensor shards, and the gradients of a sub-adapter must
   equal a single-process forward/backward of the same global batch on an unsharded copy.
2. ``trainer``: ``NLSTrainer`` with ``TrainingArguments(fsdp=True, fsdp_config={"version":
   2})``, i.e. accelerate's own FSDP2 preparation. accelerate only turns FSDP on for
   accelerator worlds (see ``fsdp_on_cpu``), so the script lets it believe it is on one while
   the Trainer builds its Accelerator. A forward pre-hook records, on every process and at
   every forward, the active configuration and the input ids.
3. ``reference``: a plain single-process loop (same initial weights, the configurations the
   Trainer drew, the union of both processes' batches, AdamW, gradient clipping) must end
   with the same adapter weights (1e-5), and take the same gradient at every step.
   ``checkpoints``: the main process writes ``nls_state.json`` and the model; the other
   writes only its RNG state. ``save_adapter``: called on every process, it gathers the
   shards and the main process writes them.
4. ``micro_batch``: the same training with ``nls_sample_every="micro_batch"`` (a new draw at
   every micro-batch): every forward's configuration is identical on both processes and is
   the history's record of that micro-batch, the two micro-batches of a step differ at
   least once, and gradients and weights equal the single-process loop that switches the
   configuration between accumulated micro-batches.

``cpu_fallback`` first shows what happens without that override: accelerate runs DDP and
``NLSTrainer`` warns that FSDP is off.

Prints ``CHECK <name> ok|FAILED <details>`` lines and ``NLS-FSDP-OK`` when all pass.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from transformers import TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import make_tiny, random_ids  # noqa: E402

from shears.adapters import add_elastic_lora, elastic_modules, get_config, set_config  # noqa: E402
from shears.export import load_adapter, save_adapter  # noqa: E402
from shears.training import NLSTrainer  # noqa: E402
from shears.training.trainer import NLS_STATE_NAME  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
RANKS = [16, 8, 4]
TOL = 1e-5


def tiny_super_adapter(base_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The same tiny Llama + fp32 super-adapter on every process (seeded), in train mode."""
    model = add_elastic_lora(make_tiny("llama", seed=0, dtype=base_dtype), TARGETS, ranks=RANKS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero B so that lora_A gets a gradient on the first step
        for _, m in elastic_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    return model.train()


def lora_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every process must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def report(name: str, ok: bool, details: str) -> bool:
    if dist.get_rank() == 0:
        print(f"CHECK {name} {'ok' if ok else 'FAILED'} {details}", flush=True)
    return ok


# ---- 1. elastic slicing on sharded parameters ---------------------------------------------

def check_slicing(reshard: bool, base_dtype: torch.dtype, tol: float) -> bool:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_super_adapter(base_dtype)
    ref = copy.deepcopy(model)  # stays whole: the single-process side
    config = {g: RANKS[i % len(RANKS)] for i, g in enumerate(get_config(model))}
    set_config(model, config)
    set_config(ref, config)
    for block in model.model.layers:
        fully_shard(block, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)

    seen: list[tuple[bool, tuple[int, ...]]] = []  # (is DTensor, shape) of lora_A in forward
    for _, m in elastic_modules(model):
        m.register_forward_pre_hook(
            lambda mod, _: seen.append((isinstance(mod.lora_A, DTensor), tuple(mod.lora_A.shape))))
    ids = random_ids(8, 16, seed=3)
    mine = ids.chunk(world)[rank]  # equal shares: the mean of local means is the global mean
    model(input_ids=mine, labels=mine).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()

    whole = all(not is_dt and shape[0] == RANKS[0] for is_dt, shape in seen)
    ref_grads = {n: p.grad for n, p in lora_params(ref).items()}
    err, sharded, inactive_zero = 0.0, True, True
    for name, p in lora_params(model).items():
        sharded &= isinstance(p, DTensor) and p.placements == (Shard(0),)
        g = full(p.grad)
        err = max(err, (g - ref_grads[name]).abs().max().item())
        mod = model.get_submodule(name.rsplit(".", 1)[0])
        r = mod.active_rank
        tail = g[r:] if name.endswith("lora_A") else g[:, r:]
        inactive_zero &= bool((tail == 0).all())
    base_frozen = all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    ok = whole and sharded and inactive_zero and base_frozen and err <= tol and len(seen) > 0
    name = f"slicing[reshard_after_forward={reshard},base={str(base_dtype)[6:]}]"
    return report(name, ok, f"lora_A whole in forward {whole} ({len(seen)} calls), DTensor "
                  f"Shard(0) between steps {sharded}, inactive slices zero grad {inactive_zero}, "
                  f"base grad None {base_frozen}, max |grad - single process| {err:.2e} "
                  f"(tol {tol:g})")


# ---- 2. NLSTrainer through accelerate's FSDP2 path ------------------------------------------

@contextlib.contextmanager
def fsdp_on_cpu():
    """Let accelerate take its FSDP path in a CPU world while the Trainer builds its Accelerator.

    accelerate 1.15 (``AcceleratorState.__init__``) turns the distributed type into FSDP only
    when the process world is one of the MULTI_<accelerator> types (MULTI_GPU, MULTI_NPU,
    ...); a gloo CPU world is MULTI_CPU, so the FSDP plugin is dropped without a word and the
    model is wrapped in DDP. Here the world is labelled MULTI_GPU until the Accelerator is
    built, which then records FSDP for the whole process exactly as on a GPU; the device
    stays the CPU, and everything after (``fully_shard`` of each decoder block and the root,
    optimizer, clipping, checkpoints) is accelerate's and the Trainer's own FSDP2 code.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    saved = PartialState().distributed_type
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    try:
        yield
    finally:  # AcceleratorState wrote FSDP here; undo only if it never got that far
        if PartialState._shared_state["distributed_type"] == DistributedType.MULTI_GPU:
            PartialState._shared_state["distributed_type"] = saved


def check_cpu_fallback(out: Path) -> bool:
    """Without ``fsdp_on_cpu``, accelerate runs DDP although FSDP was asked for; NLSTrainer
    says so. The AcceleratorState singleton is reset afterwards (as transformers' own
    hyperparameter search does) so that the next Trainer builds a fresh one."""
    from accelerate.state import AcceleratorState

    args = TrainingArguments(str(out / "fallback"), use_cpu=True, ddp_backend="gloo",
                             report_to="none", fsdp=True, fsdp_config={"version": 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = NLSTrainer(model=tiny_super_adapter(), args=args, train_dataset=[])
    warned = any("not FSDP: the model is not sharded" in str(w.message) for w in caught)
    dropped = not trainer.is_fsdp_enabled
    kind = trainer.accelerator.distributed_type
    AcceleratorState._reset_state()
    return report("cpu_fallback", warned and dropped, f"fsdp=True on CPU without the override: "
                  f"accelerate runs {kind}, is_fsdp_enabled {not dropped}, NLSTrainer warned "
                  f"{warned}")


class GradRecorder(TrainerCallback):
    """The whole adapter gradients of every optimizer step, after clipping (a collective)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.grads = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: full(p.grad).clone() for n, p in lora_params(self.model).items()})


class FSDPRun(NamedTuple):
    trainer: NLSTrainer
    seen: list[tuple[dict, torch.Tensor]]  # (active config, input ids) at every forward
    grads: list[dict[str, torch.Tensor]]  # per optimizer step
    start: torch.nn.Module  # an unsharded copy of the initial model


def train_fsdp(steps: int, out: Path, every: str = "step") -> FSDPRun:
    """NLS on 2 processes x 2 accumulated micro-batches of 2 sequences, under FSDP2;
    checkpoints (at half the steps) in "step" mode only."""
    model = tiny_super_adapter()
    start = copy.deepcopy(model)
    seen: list[tuple[dict, torch.Tensor]] = []
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((get_config(mod), kwargs["input_ids"].clone())),
        with_kwargs=True)
    data = [{"input_ids": x, "labels": x.clone()} for x in random_ids(64, 16, seed=5)]
    args = TrainingArguments(
        output_dir=str(out / f"rank{dist.get_rank()}"),  # one folder each: who wrote what
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=steps,
        learning_rate=1e-2, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        use_cpu=True, ddp_backend="gloo", report_to="none",
        save_strategy="steps" if every == "step" else "no",
        save_steps=steps // 2, disable_tqdm=True, logging_steps=1, seed=0,
        fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": True,
                                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
    )
    recorder = GradRecorder(model)
    with fsdp_on_cpu():
        trainer = NLSTrainer(model=model, args=args, train_dataset=data, nls_seed=7,
                             callbacks=[recorder], nls_sample_every=every)
    if not trainer.is_fsdp_enabled:
        raise RuntimeError("accelerate did not enable FSDP; this check would test DDP instead")
    trainer.train()
    return FSDPRun(trainer, seen, recorder.grads, start)


def check_same_configs(run: FSDPRun, everyone: list, steps: int) -> bool:
    configs = [[c for c, _ in seen] for seen in everyone]
    history = [r["config"] for r in run.trainer.nls_history.records]
    per_step = [configs[0][2 * k] for k in range(steps)]  # 2 micro-batches per step
    same_ranks = all(c == configs[0] for c in configs)
    same_in_step = all(configs[0][2 * k + 1] == per_step[k] for k in range(steps))
    distinct = len({tuple(c.values()) for c in per_step})
    ok = same_ranks and same_in_step and history == per_step and distinct > 1
    return report("configs", ok, f"{len(everyone)} processes, {len(configs[0])} forwards: "
                  f"identical on every process {same_ranks}, one per optimizer step "
                  f"{same_in_step}, equal to nls_history {history == per_step}, "
                  f"{distinct} distinct configurations")


def reference_run(start: torch.nn.Module, everyone: list, configs: list[dict],
                  accumulate: bool) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """One process, plain PyTorch: per step the global batch, i.e. the 2 x 2 micro-batches
    the two processes trained on, each under the configuration the Trainer drew for it
    (``configs``: one per micro-batch of a process); mean token loss, clipping at 1.0, AdamW
    as the Trainer's defaults (lr 1e-2 constant, no weight decay). Returns the trained model
    and the gradients of every step (after clipping).

    ``accumulate``: the global batch as 4 accumulated micro-batches of 2 (a single process
    with gradient accumulation 4) rather than one forward of the 8 sequences (which needs
    one configuration per step)."""
    model = copy.deepcopy(start)
    named = lora_params(model)
    opt = torch.optim.AdamW(named.values(), lr=1e-2, weight_decay=0.0)
    grads = []
    for k in range(len(configs) // 2):
        micro = [(configs[j], seen[j][1]) for seen in everyone for j in (2 * k, 2 * k + 1)]
        total = sum(len(b) for _, b in micro)
        if not accumulate:
            micro = [(configs[2 * k], torch.cat([b for _, b in micro]))]
        for config, batch in micro:
            set_config(model, config)
            loss = model(input_ids=batch, labels=batch).loss  # equal lengths: means add up
            (loss * len(batch) / total).backward()
        torch.nn.utils.clip_grad_norm_(named.values(), 1.0)
        grads.append({n: p.grad.clone() for n, p in named.items()})
        opt.step()
        opt.zero_grad()
    return model, grads


def check_single_process(run: FSDPRun, everyone: list) -> bool:
    """Gradients of every step and final adapter weights against ``reference_run``."""
    history = [r["config"] for r in run.trainer.nls_history.records]
    fsdp = {name: full(p.detach()) for name, p in lora_params(run.trainer.model).items()}
    init = lora_params(run.start)
    moved = max((w - init[n]).abs().max().item() for n, w in fsdp.items())
    errs = []
    per_forward = [c for c in history for _ in range(2)]  # 2 micro-batches per step
    for accumulate in (True, False):
        model, grads = reference_run(run.start, everyone, per_forward, accumulate)
        ref = lora_params(model)
        errs.append(max((w - ref[n]).abs().max().item() for n, w in fsdp.items()))
        if accumulate:
            grad_err = max((g - grads[k][n]).abs().max().item()
                           for k, step in enumerate(run.grads) for n, g in step.items())
    ok_g = len(run.grads) == len(history) and grad_err <= TOL
    ok_w = errs[0] <= TOL and moved > 1e-3
    report("gradients", ok_g, f"{len(run.grads)} steps: max |FSDP - single process| "
           f"{grad_err:.2e} (tol {TOL:g})")
    report("weights", ok_w, f"max |FSDP - single process| {errs[0]:.2e} (tol {TOL:g}) over "
           f"{len(fsdp)} adapter tensors (single process with one forward of the 8 sequences "
           f"instead of 4 accumulated micro-batches: {errs[1]:.2e}); max change from init "
           f"{moved:.2e}")
    return ok_g and ok_w


def check_micro_batch(run: FSDPRun, everyone: list, steps: int) -> bool:
    """``nls_sample_every="micro_batch"``: configurations per forward, and the training
    against the single-process loop that switches them between micro-batches."""
    configs = [[c for c, _ in seen] for seen in everyone]
    records = run.trainer.nls_history.records
    same_ranks = all(c == configs[0] for c in configs)
    as_history = [r["config"] for r in records] == configs[0]
    indices = [(r["step"], r["micro_batch"]) for r in records] == [
        (j // 2, j) for j in range(2 * steps)]
    switches = sum(configs[0][2 * k] != configs[0][2 * k + 1] for k in range(steps))
    model, grads = reference_run(run.start, everyone, configs[0], accumulate=True)
    ref = lora_params(model)
    fsdp = {name: full(p.detach()) for name, p in lora_params(run.trainer.model).items()}
    w_err = max((w - ref[n]).abs().max().item() for n, w in fsdp.items())
    g_err = max((g - grads[k][n]).abs().max().item()
                for k, step in enumerate(run.grads) for n, g in step.items())
    # Gradients are the sharp test; AdamW's first steps, g / (|g| + eps), magnify the
    # summation-order rounding of near-zero gradient entries into the weights (see
    # "weights"), more so when slices are active in only one micro-batch of a step.
    ok = (same_ranks and as_history and indices and switches > 0 and len(run.grads) == steps
          and w_err <= 10 * TOL and g_err <= TOL)
    return report("micro_batch", ok, f"{len(configs[0])} forwards: identical on every process "
                  f"{same_ranks}, equal to nls_history {as_history} (step, micro_batch indices "
                  f"{indices}), {switches}/{steps} steps switch between their micro-batches; "
                  f"max |FSDP - single process| gradients {g_err:.2e} (tol {TOL:g}), weights "
                  f"{w_err:.2e} (tol {10 * TOL:g})")


def check_checkpoints(out: Path, steps: int, history: list[dict]) -> bool:
    main, other = out / "rank0", out / "rank1"
    ckpts = sorted(main.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    ok, notes = len(ckpts) == 2, []
    for ckpt in ckpts:
        n = int(ckpt.name.split("-")[1])
        state = json.loads((ckpt / NLS_STATE_NAME).read_text())
        recs = [r["config"] for r in state["history"]["records"]]
        ok &= recs == history[:n] and (ckpt / "model.safetensors").is_file()
        notes.append(f"{ckpt.name}: {len(recs)} records")
    written = sorted({f.name for f in other.glob("checkpoint-*/*")})
    ok &= written == ["rng_state_1.pth"]
    return report("checkpoints", ok, f"main: {', '.join(notes)}; other process wrote {written}")


def check_saved_adapter(directory: Path, weights: dict[str, torch.Tensor]) -> bool:
    """``save_adapter`` gathered the shards: loaded into an unsharded model, bit for bit."""
    model = load_adapter(make_tiny("llama", seed=0), directory)
    loaded = lora_params(model)
    same = loaded.keys() == weights.keys() and all(
        torch.equal(loaded[n], w) for n, w in weights.items())
    return report("save_adapter", same, f"{len(loaded)} tensors gathered from the shards and "
                  f"written by the main process, identical to the trained weights {same}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", required=True, help="a folder for the checkpoints")
    opts = parser.parse_args()
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo")
    ok = all([
        check_slicing(True, torch.float32, TOL),
        check_slicing(False, torch.float32, TOL),
        check_slicing(True, torch.bfloat16, 1e-4),  # bf16 GEMMs of other shapes may round apart
    ])
    ok &= check_cpu_fallback(Path(opts.out))
    run = train_fsdp(opts.steps, Path(opts.out))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, run.seen)
    history = [r["config"] for r in run.trainer.nls_history.records]
    ok &= check_same_configs(run, everyone, opts.steps)
    ok &= check_single_process(run, everyone)  # every process computes both sides
    weights = {n: full(p.detach()) for n, p in lora_params(run.trainer.model).items()}
    save_adapter(run.trainer.model, Path(opts.out) / "super_adapter")  # on every process
    dist.barrier()
    if dist.get_rank() == 0:
        ok &= check_checkpoints(Path(opts.out), opts.steps, history)
        ok &= check_saved_adapter(Path(opts.out) / "super_adapter", weights)
    del run
    gc.collect()
    run = train_fsdp(opts.steps, Path(opts.out) / "micro_batch", every="micro_batch")
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, run.seen)
    ok &= check_micro_batch(run, everyone, opts.steps)
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if dist.get_rank() == 0:
        print("NLS-FSDP-OK" if flag.item() else "NLS-FSDP-FAILED", flush=True)
    del run
    gc.collect()  # drop the FSDP modules before the process group goes away
    dist.destroy_process_group()
    return 0 if flag.item() else 1


if __name__ == "__main__":
    sys.exit(main())
