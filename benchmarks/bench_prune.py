"""Wanda: shears against a reference-style implementation, same run, same weights.

    python benchmarks/bench_prune.py --data ../shared/data [--device cuda]
    python benchmarks/bench_prune.py --model random-7b --device cuda --json prune_7b.json

SmolLM2-135M (the default), protocol of issue #2: WikiText-2 test tokenized as one string;
32 calibration windows of 256 tokens drawn (seed 0) from the second half; perplexity over
the first 40 non-overlapping 512-token windows of the first half; fp32 model. Each pruning
run happens in a fresh subprocess so that its peak memory is its own; runs alternate and
the fastest of ``--repeats`` is kept for each implementation.

Random Llama models of real shapes (``random-tiny``, ``random-1b``, ``random-7b``; see
``random_llama.py``) need no download and no ``datasets``: calibration is random token ids
(default 128 x 2048), the base is bf16 on CUDA and fp32 on CPU, ``--blocks N`` keeps the
first N blocks, and there is no perplexity (the weights mean nothing). Every run builds the
same seeded model afresh in this process; on CUDA its peak memory is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` once the model is
built, so runs in one process do not see each other's peaks (on CPU the in-process peak RSS
is only indicative). ``--profile FILE`` instead profiles one shears run and writes the
operator table, to see where the time goes.

``--floor`` (issue 18, any model) times ``wanda_prune`` against the floor of sequential
Wanda in the same process: the first block's inputs captured as ``wanda_prune`` captures
them, then two plain forwards of every block over the calibration set, in the same chunks
(``--batch-sizes``) and with no hooks: one whose outputs are dropped (the statistics
forward), one that overwrites the hidden-state buffer (the next block's inputs). Sides
alternate (ABBA) on the same weights, restored before every run, and the median over
``--repeats`` of the per-round ratio ours / floor is reported; also against a tight floor,
the matmuls ``wanda_prune`` computes itself (its statistics forward stops at the last map's
input, and the last block is not run twice), so that ours / tight floor is pure overhead:

    OMP_NUM_THREADS=1 python benchmarks/bench_prune.py --floor --batch-sizes 8,1 --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from random_llama import PRESETS, random_ids, random_llama, resolve_dtype
from torch import nn

from shears import wanda_prune
from shears.evaluation.perplexity import perplexity
from shears.pruning.calibration import as_calibration
from shears.pruning.capture import call_block, capture_block_inputs
from shears.pruning.layers import find_decoder_blocks, linear_modules

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from smollm2 import load_smollm2  # noqa: E402  (the examples' model loader)
from wikitext_protocol import protocol_ids  # noqa: E402  (benchmarks/, on sys.path)

# implementation -> wanda_prune batch size (None: the reference below)
IMPLS = {"reference": None, "shears (batch 1, default)": 1, "shears batch 8": 8}


# ---- the reference: locuslab/wanda lib/prune.py (prune_wanda + WrappedGPT), batch 1 ----
class WrappedGPT:
    def __init__(self, layer):
        self.layer = layer
        self.scaler_row = torch.zeros(layer.weight.shape[1], device=layer.weight.device)
        self.nsamples = 0

    def add_batch(self, inp, out):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


@torch.no_grad()
def reference_wanda(model, calib: torch.Tensor, sparsity: float) -> None:
    layers = model.model.layers  # architecture-specific, as in the reference
    n, seqlen = calib.shape
    device = next(model.parameters()).device
    dtype = next(iter(model.parameters())).dtype  # as the reference's prepare_calibration_input
    inps = torch.zeros((n, seqlen, model.config.hidden_size), dtype=dtype, device=device)
    cache = {"i": 0, "kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps[cache["i"]] = inp
            cache["i"] += 1
            cache["kwargs"] = kwargs
            raise ValueError

    layers[0] = Catcher(layers[0])
    for j in range(n):
        try:
            model(calib[j : j + 1].to(device), use_cache=False)
        except ValueError:
            pass
    layers[0] = layers[0].module
    outs = torch.zeros_like(inps)
    kwargs = cache["kwargs"]
    for layer in layers:
        subset = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        wrapped = {name: WrappedGPT(subset[name]) for name in subset}

        def add_batch(name, wrapped=wrapped):
            return lambda _, inp, out: wrapped[name].add_batch(inp[0].data, out.data)

        handles = [subset[name].register_forward_hook(add_batch(name)) for name in wrapped]
        for j in range(n):
            outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
        for h in handles:
            h.remove()
        for name in subset:
            w_metric = torch.abs(subset[name].weight.data) * torch.sqrt(
                wrapped[name].scaler_row.reshape((1, -1)))
            w_mask = torch.zeros_like(w_metric) == 1
            sort_res = torch.sort(w_metric, dim=-1, stable=True)
            indices = sort_res[1][:, : int(w_metric.shape[1] * sparsity)]
            w_mask.scatter_(1, indices, True)
            subset[name].weight.data[w_mask] = 0
        for j in range(n):
            outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
        inps, outs = outs, inps
# ---- end of the reference ----


# ---- the floor (issue 18): what sequential Wanda cannot go below ----
class _Enough(Exception):
    """Raised by the tight floor once every linear map of a block has seen its input."""


@torch.no_grad()
def floor_passes(model: nn.Module, calib: torch.Tensor, batch_size: int,
                 tight: bool = False) -> None:
    """The first block's inputs captured as ``wanda_prune`` does, then two forwards of every
    block over the calibration set in chunks of ``batch_size``: the first's outputs dropped
    (statistics), the second's written over the hidden-state buffer (the next block's
    inputs). No hooks, except with ``tight``: the matmuls ``wanda_prune`` itself computes,
    i.e. the first forward abandoned once every linear map has seen its input (a pre-hook
    that only counts) and the last block not run a second time."""
    calibration = as_calibration(calib)
    _, blocks = find_decoder_blocks(model)
    device = next(model.parameters()).device
    inputs = capture_block_inputs(model, blocks[0], calibration, batch_size, device)
    starts = [start for start, _, _ in calibration.batches(batch_size)]
    for i, block in enumerate(blocks):
        maps = [m for m in block.modules() if isinstance(m, nn.Linear)]
        pending: set[int] = set()

        def seen(module, args, pending=pending):
            pending.discard(id(module))
            if not pending:
                raise _Enough

        handles = [m.register_forward_pre_hook(seen) for m in maps] if tight else []
        for b, start in enumerate(starts):
            pending.update(id(m) for m in maps)
            try:
                call_block(block, inputs, b, inputs.hidden[start : start + batch_size], device)
            except _Enough:
                pass
        for h in handles:
            h.remove()
        if tight and i == len(blocks) - 1:
            break
        for b, start in enumerate(starts):
            out = call_block(block, inputs, b, inputs.hidden[start : start + batch_size], device)
            inputs.hidden[start : start + out.shape[0]].copy_(out)
# ---- end of the floor ----


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def timed_prune(model: nn.Module, calib: torch.Tensor, batch_size: int | None,
                device: str) -> dict:
    """Prune ``model`` at 50% (``batch_size`` None: the reference); seconds and peak bytes."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        base = _kib("VmRSS") * 1024
    t0 = time.perf_counter()
    if batch_size is None:
        reference_wanda(model, calib, 0.5)
    else:
        wanda_prune(model, calib, 0.5, batch_size=batch_size, progress=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else _kib("VmHWM") * 1024
    return {"seconds": seconds, "peak": peak, "base": base}


def model_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Qualified name -> (out, in) bool mask of zeros (on CPU) of every block's linear map."""
    masks = {}
    for i, layer in enumerate(model.model.layers):
        for name, m in linear_modules(layer, f"model.layers.{i}").items():
            masks[name] = (m.weight == 0).cpu()
    return masks


def worker(impl: str, calib_path: str, out_path: str, device: str) -> None:
    """Prune SmolLM2 once with ``impl`` and write time, peak memory and the masks."""
    model, _ = load_smollm2()
    model.to(device).config.use_cache = False
    calib = torch.load(calib_path)
    with torch.no_grad():  # fault in every weight page (the checkpoint is memory-mapped), so
        for p in model.parameters():  # that the baseline below holds the whole model
            p.sum()
    result = timed_prune(model, calib, IMPLS[impl], device)
    torch.save({**result, "masks": model_masks(model)}, out_path)


def run_worker(impl: str, calib_path: str, tmp: Path, device: str, k: int) -> dict:
    out = tmp / f"{impl.replace(' ', '_')}{k}.pt"
    cmd = [sys.executable, __file__, "--worker", impl, "--calib", calib_path, "--out", str(out),
           "--device", device]
    subprocess.run(cmd, check=True)
    return torch.load(out)


def agreement(a: dict, b: dict) -> float:
    same = sum(int((a[n] == b[n]).sum()) for n in a)
    return same / sum(a[n].numel() for n in a)


def block_agreement(a: dict, b: dict) -> list[float]:
    """Mask agreement per decoder block (names ``model.layers.<i>.*``), in block order."""
    blocks: dict[int, list[str]] = {}
    for name in a:
        blocks.setdefault(int(name.split(".")[2]), []).append(name)
    return [agreement({n: a[n] for n in names}, {n: b[n] for n in names})
            for _, names in sorted(blocks.items())]


def masked_ppl(masks: dict, ppl_ids, device) -> float:
    model, _ = load_smollm2()
    named = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            named[name].weight.masked_fill_(mask, 0)
    return perplexity(model.to(device), ppl_ids, 512, max_windows=40, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="data folder (default $SHEARS_DATA_DIR)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--model", default="smollm2", choices=["smollm2", *PRESETS])
    p.add_argument("--blocks", type=int, default=None, help="random models: first N blocks")
    p.add_argument("--nsamples", type=int, default=128, help="random models: calibration rows")
    p.add_argument("--seqlen", type=int, default=2048, help="random models: tokens per row")
    p.add_argument("--batch-sizes", default="1,8", help="random models: shears batch sizes")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="random models; auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--profile", default=None,
                   help="profile one shears run (the first of --batch-sizes; random models: "
                        "batch 1), write the operator table here")
    p.add_argument("--floor", action="store_true",
                   help="wanda_prune against two plain forwards per block, same process")
    p.add_argument("--worker"), p.add_argument("--calib"), p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.calib, args.out, args.device)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    if args.floor:
        return main_floor(args)
    if args.model in PRESETS:
        return main_random(args)
    if args.blocks is not None:
        p.error("--blocks is for the random models")
    if args.profile:
        return profile_smollm2(args)

    _, tok = load_smollm2()
    ids, calib, ppl_ids = protocol_ids(tok, args.data)
    print(f"WikiText-2 test: {ids.numel()} tokens; calibration {tuple(calib.shape)}; "
          f"device {args.device}; torch threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib_path = str(tmp / "calib.pt")
        torch.save(calib, calib_path)
        runs = {impl: [] for impl in IMPLS}
        for k in range(args.repeats):
            for impl in runs:
                runs[impl].append(run_worker(impl, calib_path, tmp, args.device, k))
                print(f"  {impl} run {k}: {runs[impl][-1]['seconds']:.1f} s", flush=True)
    best = {impl: min(r, key=lambda x: x["seconds"]) for impl, r in runs.items()}
    summary = {"device": args.device, "threads": torch.get_num_threads(), "implementations": {}}
    for impl, r in runs.items():
        summary["implementations"][impl] = {
            "time_s": best[impl]["seconds"],
            "peak_mib": max(x["peak"] for x in r) / 2**20,
            "peak_above_model_mib": max(x["peak"] - x["base"] for x in r) / 2**20,
            "mask_agreement": agreement(best[impl]["masks"], best["reference"]["masks"]),
        }
    summary["perplexity"] = perplexities(best, calib, ppl_ids, args.device)
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


def perplexities(best: dict, calib, ppl_ids, device) -> dict[str, float]:
    model, _ = load_smollm2()
    model.to(device)
    results = {"dense": perplexity(model, ppl_ids, 512, max_windows=40, progress=False)}
    for impl, run in best.items():
        results[f"wanda 50% ({impl})"] = masked_ppl(run["masks"], ppl_ids, device)
    wanda_prune(model, None, 0.5, method="magnitude", progress=False)
    results["magnitude 50%"] = perplexity(model, ppl_ids, 512, max_windows=40, progress=False)
    model, _ = load_smollm2()
    wanda_prune(model.to(device), calib, pattern="2:4", progress=False)
    results["wanda 2:4 (shears)"] = perplexity(model, ppl_ids, 512, max_windows=40,
                                                        progress=False)
    return results


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def print_summary(summary: dict) -> None:
    impls = summary["implementations"]
    ref = impls["reference"]
    kind = "allocated" if summary["device"].startswith("cuda") else "RSS"
    print(f"\n| implementation | time (s) | time / ref | peak {kind} (MiB) | peak / ref "
          "| peak above model (MiB) | above / ref | mask agreement |\n" + "|---" * 8 + "|")
    for impl, r in impls.items():
        print(f"| {impl} | {r['time_s']:.2f} | {_ratio(r['time_s'], ref['time_s'])} "
              f"| {r['peak_mib']:.0f} | {_ratio(r['peak_mib'], ref['peak_mib'])} "
              f"| {r['peak_above_model_mib']:.0f} "
              f"| {_ratio(r['peak_above_model_mib'], ref['peak_above_model_mib'])} "
              f"| {r['mask_agreement']:.5%} |")
    if "perplexity" in summary:
        print("\n| model | WikiText-2 perplexity |\n|---|---|")
        for name, value in summary["perplexity"].items():
            print(f"| {name} | {value:.2f} |")


# ---- random models of real shapes: everything in this process ------------------------------

def fresh_model(args: argparse.Namespace) -> nn.Module:
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the previous run's blocks go back before the next model
    return random_llama(args.model, args.blocks, device=args.device,
                        dtype=resolve_dtype(args.dtype, args.device))


def main_random(args: argparse.Namespace) -> None:
    """Reference and shears on the same seeded random model and random calibration ids."""
    calib = random_ids(args.nsamples, args.seqlen, PRESETS[args.model]["vocab_size"])
    if args.profile:
        return profile_shears(args, calib)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    impls = {"reference": None} | {
        f"shears batch {b}" + (" (default)" if b == 1 else ""): b for b in sizes}
    print(f"{args.model}, {args.blocks or 'all'} blocks, calibration {tuple(calib.shape)}, "
          f"device {args.device}", flush=True)
    runs: dict[str, list[dict]] = {impl: [] for impl in impls}
    ref_masks = None
    for k in range(args.repeats):
        for impl, batch_size in impls.items():  # alternate, as drifting load hits all alike
            model = fresh_model(args)
            run = timed_prune(model, calib, batch_size, args.device)
            masks = model_masks(model)
            del model
            if ref_masks is None:  # the first reference run is the yardstick
                ref_masks = masks
            run["agreement"] = agreement(masks, ref_masks)
            run["block_agreement"] = block_agreement(masks, ref_masks)
            runs[impl].append(run)
            print(f"  {impl} run {k}: {run['seconds']:.2f} s, peak "
                  f"{run['peak'] / 2**20:.0f} MiB, masks {run['agreement']:.5%}", flush=True)
    summary = random_summary(args, calib, runs)
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


def random_summary(args: argparse.Namespace, calib: torch.Tensor, runs: dict) -> dict:
    import transformers

    cuda = args.device.startswith("cuda")
    summary = {
        "model": args.model, "blocks": args.blocks or PRESETS[args.model]["num_hidden_layers"],
        "device": args.device, "dtype": str(resolve_dtype(args.dtype, args.device)),
        "calibration": list(calib.shape), "repeats": args.repeats,
        "memory": "torch.cuda.max_memory_allocated" if cuda else "VmHWM, in-process",
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        **({"gpu": torch.cuda.get_device_name()} if cuda else
                           {"torch_threads": torch.get_num_threads()})},
        "implementations": {},
    }
    for impl, rs in runs.items():
        best = min(rs, key=lambda r: r["seconds"])
        summary["implementations"][impl] = {
            "time_s": best["seconds"], "all_times_s": [r["seconds"] for r in rs],
            "peak_mib": max(r["peak"] for r in rs) / 2**20,
            "peak_above_model_mib": max(r["peak"] - r["base"] for r in rs) / 2**20,
            "mask_agreement": best["agreement"], "block_agreement": best["block_agreement"],
        }
    return summary


def profile_shears(args: argparse.Namespace, calib: torch.Tensor) -> None:
    """One shears batch-1 run under torch.profiler (after one warm-up run on a fresh model)."""
    wanda_prune(fresh_model(args), calib[:2], 0.5, progress=False)  # kernels, allocator warm
    write_profile(args, fresh_model(args), calib, 1, args.model)


def write_profile(args: argparse.Namespace, model: nn.Module, calib: torch.Tensor,
                  batch_size: int, name: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run = timed_prune(model, calib, batch_size, args.device)
    unit = "cuda" if cuda else "cpu"  # torch maps "cuda" to "device" in the sort keys
    averages = prof.key_averages()
    table = (f"by self {unit} time:\n"
             + averages.table(sort_by=f"self_{unit}_time_total", row_limit=30)
             + f"\nby total {unit} time (children included):\n"
             + averages.table(sort_by=f"{unit}_time_total", row_limit=20))
    head = (f"{name}, {args.blocks or 'all'} blocks, calibration {tuple(calib.shape)}, "
            f"batch {batch_size}, {args.device}, {torch.get_num_threads()} threads: "
            f"{run['seconds']:.2f} s under the profiler\n")
    Path(args.profile).write_text(head + table)
    print(head + table)


# ---- ours against the floor, in one process (issue 18) ---------------------------------------

def floor_model(args: argparse.Namespace):
    """``(calib, make)``: the calibration ids and a function giving the dense model afresh
    (SmolLM2: its weights copied back from a dense copy; random models: built again)."""
    if args.model in PRESETS:
        calib = random_ids(args.nsamples, args.seqlen, PRESETS[args.model]["vocab_size"])
        return calib, lambda: fresh_model(args)
    model, tok = load_smollm2()
    model.to(args.device).config.use_cache = False
    _, calib, _ = protocol_ids(tok, args.data)
    dense = [p.detach().clone() for p in model.parameters()]

    def make() -> nn.Module:
        with torch.no_grad():
            for p, d in zip(model.parameters(), dense, strict=True):
                p.copy_(d)
        return model

    return calib, make


def _seconds(fn, device: str, *args) -> float:
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*args)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main_floor(args: argparse.Namespace) -> None:
    """Per batch size: ``--repeats`` rounds (ours, floor, tight floor), order reversed every
    other round, on the same weights."""
    calib, make = floor_model(args)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"{args.model}, calibration {tuple(calib.shape)}, device {args.device}, torch "
          f"threads {torch.get_num_threads()}", flush=True)
    sides = {
        "shears": lambda m, b: wanda_prune(m, calib, 0.5, batch_size=b, progress=False),
        "floor": lambda m, b: floor_passes(m, calib, b),
        "tight floor": lambda m, b: floor_passes(m, calib, b, tight=True),
    }
    floor_passes(make(), calib[: max(sizes)], max(sizes))  # warm-up: kernels, allocator
    summary = {"model": args.model, "device": args.device, "threads": torch.get_num_threads(),
               "calibration": list(calib.shape), "repeats": args.repeats, "batch_sizes": {}}
    for b in sizes:
        times = {side: [] for side in sides}
        for k in range(args.repeats):
            order = list(sides) if k % 2 == 0 else list(sides)[::-1]
            for side in order:
                model = make()
                times[side].append(_seconds(sides[side], args.device, model, b))
            print(f"  batch {b} round {k}: " + ", ".join(
                f"{side} {t[-1]:.2f} s" for side, t in times.items()), flush=True)
        result = {f"{side}_s": t for side, t in times.items()}
        for side in ("floor", "tight floor"):
            ratios = [a / f for a, f in zip(times["shears"], times[side], strict=True)]
            result[f"shears / {side}"] = ratios
            result[f"median shears / {side}"] = statistics.median(ratios)
        summary["batch_sizes"][b] = result
    print("\n| batch size | shears (s, median) | floor (s, median) | shears / floor (median of "
          "rounds) | tight floor (s, median) | shears / tight floor (median) | all rounds, "
          "shears / floor |\n|---|---|---|---|---|---|---|")
    for b, r in summary["batch_sizes"].items():
        med = {side: statistics.median(r[f"{side}_s"]) for side in sides}
        print(f"| {b} | {med['shears']:.2f} | {med['floor']:.2f} "
              f"| **{r['median shears / floor']:.3f}** | {med['tight floor']:.2f} "
              f"| {r['median shears / tight floor']:.3f} "
              f"| {', '.join(f'{x:.3f}' for x in r['shears / floor'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


def profile_smollm2(args: argparse.Namespace) -> None:
    """One SmolLM2 ``wanda_prune`` run (the first of --batch-sizes) under torch.profiler."""
    calib, make = floor_model(args)
    batch_size = int(args.batch_sizes.split(",")[0])
    wanda_prune(make(), calib[:batch_size], 0.5, batch_size=batch_size, progress=False)
    write_profile(args, make(), calib, batch_size, "smollm2")


if __name__ == "__main__":
    main()
