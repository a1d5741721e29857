"""OWL against uniform Wanda and magnitude on SmolLM2-135M, one run, resumable (issue #18).

    OMP_NUM_THREADS=1 python benchmarks/bench_owl.py --data ../shared/data --json owl.json
    OMP_NUM_THREADS=1 python benchmarks/bench_owl.py --data ../shared/data --json tune.json \\
        --split tune --rows "wanda 70%,owl 70% M5 l0.04,owl 70% M5 l0.08,owl 70% M5 l0.12"

bench_prune.py's protocol (benchmarks/wikitext_protocol.py): 32 calibration windows of 256
tokens (seed 0) from the second half of WikiText-2 test, fp32 model, one thread.
``--split test`` scores the first 40 non-overlapping 512-token windows of the first half
(the table); ``--split tune`` scores the first 40 windows of the second half, the side the
calibration comes from, so that M and lambda are chosen without seeing the test windows.

Every row prunes a fresh copy of the dense weights. Rows are written to ``--json`` (atomic,
one rewrite per row) as soon as measured, and rows already there are skipped, so a killed
run resumes. A row name says what it is: ``dense``, ``magnitude 60%``, ``wanda 60%``,
``wanda 2:4``, ``owl 60%`` (M 5, lambda 0.08), ``owl 70% M5 l0.12``, ``owl 70% rows8``
(OWL's dense pass on the first 8 calibration rows only), ``magnitude-owl 70%``. Each row
records the perplexity, the pruning seconds and, for OWL, the allocation and outlier ratios.
The summary adds, per sparsity, OWL seconds / uniform Wanda seconds (rows of one run, one
after the other, so drifting load on a shared machine shows as noise in the ratio).

``--timing "wanda 50%,owl 50%,owl 50% rows4" --repeats 3`` instead times those prunes only
(no perplexity), alternating them ``--repeats`` times, and records every time, the fastest
of each and its ratio to the fastest of the first (results["timing"]).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from shears import wanda_prune
from shears.atomic import read_json, write_json
from shears.evaluation.perplexity import perplexity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from smollm2 import load_smollm2  # noqa: E402  (the examples' model loader)
from wikitext_protocol import protocol_ids  # noqa: E402  (benchmarks/, on sys.path)

DEFAULT_ROWS = ["dense", "wanda 2:4"] + [
    f"{kind} {s}%" for s in (50, 60, 70) for kind in ("magnitude", "wanda", "owl")
] + ["owl 70% rows8", "owl 70% rows4"]

ROW = re.compile(r"(?P<kind>dense|magnitude-owl|magnitude|wanda|owl)"
                 r"(?: (?:(?P<pct>\d+)%|(?P<nm>\d+:\d+)))?"
                 r"(?: M(?P<m>[\d.]+))?(?: l(?P<lam>[\d.]+))?(?: rows(?P<rows>\d+))?")


def parse_row(name: str) -> dict:
    match = ROW.fullmatch(name)
    if match is None:
        raise ValueError(f"cannot read row {name!r}")
    g = match.groupdict()
    kw = {}
    if g["nm"]:
        kw["pattern"] = g["nm"]
    elif g["pct"]:
        kw["sparsity"] = int(g["pct"]) / 100
    if g["kind"] in ("magnitude", "magnitude-owl"):
        kw["method"] = "magnitude"
    if g["kind"] in ("owl", "magnitude-owl"):
        kw["allocation"] = "owl"
        kw["owl_threshold"] = float(g["m"] or 5.0)
        kw["owl_lambda"] = float(g["lam"] or 0.08)
        kw["owl_rows"] = int(g["rows"]) if g["rows"] else None
    return {"kind": g["kind"], "kwargs": kw}


def measure(model, dense: dict, name: str, calib, ppl_ids, windows: int,
            batch_size: int) -> dict:
    model.load_state_dict(dense)
    spec = parse_row(name)
    row = {"row": name, **{k: v for k, v in spec["kwargs"].items() if k != "sparsity"},
           "sparsity": spec["kwargs"].get("sparsity")}
    if spec["kind"] != "dense":
        t0 = time.perf_counter()
        report = wanda_prune(model, calib, batch_size=batch_size, progress=False,
                             **spec["kwargs"])
        row["seconds"] = time.perf_counter() - t0
        row["measured_sparsity"] = report.sparsity
        row["allocation"] = report.allocation
        row["outlier_ratios"] = report.outlier_ratios
    row["perplexity"] = perplexity(model, ppl_ids, 512, max_windows=windows, progress=False)
    return row


def summarise(rows: dict) -> dict:
    ratios = {}
    for name, row in rows.items():
        spec = parse_row(name)
        uniform = rows.get(f"wanda {name.split()[1]}") if spec["kind"] == "owl" else None
        if uniform and "seconds" in row:
            ratios[name] = row["seconds"] / uniform["seconds"]
    return {"owl_over_uniform_seconds": ratios}


def print_table(results: dict) -> None:
    print("\n| row | perplexity | prune seconds | OWL / uniform time |\n|---|---|---|---|")
    ratios = results.get("summary", {}).get("owl_over_uniform_seconds", {})
    for name, row in results["rows"].items():
        secs = f"{row['seconds']:.1f}" if "seconds" in row else ""
        ratio = f"{ratios[name]:.2f}x" if name in ratios else ""
        print(f"| {name} | {row['perplexity']:.2f} | {secs} | {ratio} |")


def timing(model, dense: dict, names: list[str], calib, repeats: int, batch_size: int,
           path: Path, results: dict) -> None:
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        for name in names:  # alternate, as drifting load hits all alike
            model.load_state_dict(dense)
            t0 = time.perf_counter()
            wanda_prune(model, calib, batch_size=batch_size, progress=False,
                        **parse_row(name)["kwargs"])
            seconds[name].append(time.perf_counter() - t0)
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    best = {n: min(s) for n, s in seconds.items()}
    results["timing"] = {"seconds": seconds, "fastest": best,
                         "over_first": {n: best[n] / best[names[0]] for n in names}}
    write_json(path, results, indent=1)
    for name in names:
        print(f"| {name} | {best[name]:.1f} s | {best[name] / best[names[0]]:.3f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="folder holding wikitext-2-raw/")
    p.add_argument("--json", required=True, help="results file (read first: resumes)")
    p.add_argument("--split", choices=["test", "tune"], default="test")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated row names")
    p.add_argument("--windows", type=int, default=40, help="512-token perplexity windows")
    p.add_argument("--batch-size", type=int, default=1, help="wanda_prune batch_size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timing", default=None, help="comma-separated rows to time only")
    p.add_argument("--repeats", type=int, default=3, help="--timing: rounds")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for name in rows:
        parse_row(name)  # refuse a typo before an hour of measurements
    path = Path(args.json)
    results = read_json(path, "results") if path.exists() else {}
    settings = {"split": args.split, "windows": args.windows, "batch_size": args.batch_size,
                "threads": args.threads}
    if results and results.get("settings") != settings:
        raise SystemExit(f"{path} was measured with {results.get('settings')}, not "
                         f"{settings}; use another --json")
    results.setdefault("settings", settings)
    results.setdefault("rows", {})
    model, tok = load_smollm2()
    model.config.use_cache = False
    ids, calib, test_ids = protocol_ids(tok, args.data)
    ppl_ids = test_ids if args.split == "test" else ids[ids.numel() // 2 :]
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    if args.timing:
        names = [r.strip() for r in args.timing.split(",") if r.strip()]
        timing(model, dense, names, calib, args.repeats, args.batch_size, path, results)
        return
    for name in rows:
        if name in results["rows"]:
            continue
        row = measure(model, dense, name, calib, ppl_ids, args.windows, args.batch_size)
        results["rows"][name] = row
        results["summary"] = summarise(results["rows"])
        write_json(path, results, indent=1)
        print(f"{name}: perplexity {row['perplexity']:.2f}"
              + (f", {row['seconds']:.1f} s" if "seconds" in row else ""), flush=True)
    print_table(results)


if __name__ == "__main__":
    main()
