"""Wanda on SmolLM2-135M: shears against a reference-style implementation, same run.

    python benchmarks/bench_prune.py --data ../shared/data [--device cuda]

Protocol (issue #2): WikiText-2 test tokenized as one string; 32 calibration windows of 256
tokens drawn (seed 0) from the second half; perplexity over the first 40 non-overlapping
512-token windows of the first half; fp32 model. Each pruning run happens in a fresh
subprocess so that its peak memory is its own; runs alternate and the fastest of
``--repeats`` is kept for each implementation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from shears import wanda_prune
from shears.evaluation.perplexity import perplexity, wikitext2_ids
from shears.pruning.layers import linear_modules

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from smollm2 import load_smollm2  # noqa: E402  (the examples' model loader)

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
    inps = torch.zeros((n, seqlen, model.config.hidden_size), device=device)
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


def worker(impl: str, calib_path: str, out_path: str, device: str) -> None:
    """Prune once with ``impl`` and write time, peak memory and the masks."""
    model, _ = load_smollm2()
    model.to(device).config.use_cache = False
    calib = torch.load(calib_path)
    with torch.no_grad():  # fault in every weight page (the checkpoint is memory-mapped), so
        for p in model.parameters():  # that the baseline below holds the whole model
            p.sum()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        base = _kib("VmRSS") * 1024
    t0 = time.perf_counter()
    if IMPLS[impl] is None:
        reference_wanda(model, calib, 0.5)
    else:
        wanda_prune(model, calib, 0.5, batch_size=IMPLS[impl], progress=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else _kib("VmHWM") * 1024
    masks = {}
    for i, layer in enumerate(model.model.layers):
        for name, m in linear_modules(layer, f"model.layers.{i}").items():
            masks[name] = (m.weight == 0).cpu()
    torch.save({"seconds": seconds, "peak": peak, "base": base, "masks": masks}, out_path)


def run_worker(impl: str, calib_path: str, tmp: Path, device: str, k: int) -> dict:
    out = tmp / f"{impl.replace(' ', '_')}{k}.pt"
    cmd = [sys.executable, __file__, "--worker", impl, "--calib", calib_path, "--out", str(out),
           "--device", device]
    subprocess.run(cmd, check=True)
    return torch.load(out)


def agreement(a: dict, b: dict) -> float:
    same = sum(int((a[n] == b[n]).sum()) for n in a)
    return same / sum(a[n].numel() for n in a)


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
    p.add_argument("--worker"), p.add_argument("--calib"), p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.calib, args.out, args.device)

    _, tok = load_smollm2()
    ids = wikitext2_ids(tok, args.data)
    half = ids.numel() // 2
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(half, ids.numel() - 257, (32,), generator=g)
    calib = torch.stack([ids[s : s + 256] for s in starts.tolist()])
    ppl_ids = ids[:half]
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


def print_summary(summary: dict) -> None:
    impls = summary["implementations"]
    ref = impls["reference"]
    print("\n| implementation | time (s) | time / ref | peak RSS (MiB) | peak / ref "
          "| peak above model (MiB) | above / ref | mask agreement |\n" + "|---" * 8 + "|")
    for impl, r in impls.items():
        print(f"| {impl} | {r['time_s']:.1f} | {r['time_s'] / ref['time_s']:.3f} "
              f"| {r['peak_mib']:.0f} | {r['peak_mib'] / ref['peak_mib']:.3f} "
              f"| {r['peak_above_model_mib']:.0f} "
              f"| {r['peak_above_model_mib'] / ref['peak_above_model_mib']:.3f} "
              f"| {r['mask_agreement']:.5%} |")
    print("\n| model | WikiText-2 perplexity |\n|---|---|")
    for name, value in summary["perplexity"].items():
        print(f"| {name} | {value:.2f} |")


if __name__ == "__main__":
    main()
