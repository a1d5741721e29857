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
from shears.models import load_smollm2
from shears.pruning.layers import linear_modules


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
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        base = _kib("VmRSS") * 1024
    t0 = time.perf_counter()
    if impl == "shears":
        wanda_prune(model, calib, 0.5, batch_size=8, progress=False)
    else:
        reference_wanda(model, calib, 0.5)
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
    out = tmp / f"{impl}{k}.pt"
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
        runs = {"reference": [], "shears": []}
        for k in range(args.repeats):
            for impl in runs:
                runs[impl].append(run_worker(impl, calib_path, tmp, args.device, k))
                print(f"  {impl} run {k}: {runs[impl][-1]['seconds']:.1f} s")
    best = {impl: min(r, key=lambda x: x["seconds"]) for impl, r in runs.items()}
    extra = {impl: max(x["peak"] - x["base"] for x in r) for impl, r in runs.items()}
    peak = {impl: max(x["peak"] for x in r) for impl, r in runs.items()}

    model, _ = load_smollm2()
    model.to(args.device)
    results = {"dense": perplexity(model, ppl_ids, 512, max_windows=40, progress=False)}
    results["wanda 50% (shears)"] = masked_ppl(best["shears"]["masks"], ppl_ids, args.device)
    results["wanda 50% (reference)"] = masked_ppl(best["reference"]["masks"], ppl_ids,
                                                  args.device)
    wanda_prune(model, None, 0.5, method="magnitude", progress=False)
    results["magnitude 50%"] = perplexity(model, ppl_ids, 512, max_windows=40, progress=False)
    model, _ = load_smollm2()
    wanda_prune(model.to(args.device), calib, pattern="2:4", progress=False)
    results["wanda 2:4 (shears)"] = perplexity(model, ppl_ids, 512, max_windows=40,
                                               progress=False)

    agree = agreement(best["shears"]["masks"], best["reference"]["masks"])
    mib = 2**20
    summary = {
        "device": args.device,
        "time_s": {k: v["seconds"] for k, v in best.items()},
        "time_ratio": best["shears"]["seconds"] / best["reference"]["seconds"],
        "peak_mib": {k: v / mib for k, v in peak.items()},
        "peak_ratio": peak["shears"] / peak["reference"],
        "peak_above_model_mib": {k: v / mib for k, v in extra.items()},
        "peak_above_model_ratio": extra["shears"] / extra["reference"],
        "mask_agreement": agree,
        "perplexity": results,
    }
    print("\n| | reference | shears | shears/reference |\n|---|---|---|---|")
    print(f"| prune time (s) | {best['reference']['seconds']:.1f} | "
          f"{best['shears']['seconds']:.1f} | {summary['time_ratio']:.3f} |")
    print(f"| peak memory (MiB) | {peak['reference'] / mib:.0f} | {peak['shears'] / mib:.0f} | "
          f"{summary['peak_ratio']:.3f} |")
    print(f"| peak above the loaded model (MiB) | {extra['reference'] / mib:.0f} | "
          f"{extra['shears'] / mib:.0f} | {summary['peak_above_model_ratio']:.3f} |")
    print(f"\nmask agreement shears vs reference: {agree:.5%}\n\n| model | perplexity |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
