"""NLS sampling per optimizer step vs per micro-batch, on one Wanda-pruned model.

Trains the NLS super-adapter of examples/reproduce.py twice (same seed, data, steps,
optimizer, schedule, adapter initialisation), once with ``nls_sample_every="step"`` and once
with ``"micro_batch"`` (the authors'), and measures the held-out loss
(``shears.evaluate_loss``) of the maximal, heuristic and minimal sub-adapters on
reproduce.py's validation slice, and on a second held-out slice: the next
``--extra-records`` records of the training pool, which training never sees.

Every piece comes from reproduce.py (arguments, data split, model, Wanda, train_adapter),
so its flags apply. The pruned model is saved once (``<out>/pruned.pt``) and reused, so the
two modes can run as two processes:

    python benchmarks/nls_sample_every.py --modes none ...        # prune and save, once
    python benchmarks/nls_sample_every.py --modes step ...        # then each mode,
    python benchmarks/nls_sample_every.py --modes micro_batch ... # in parallel if you like

with reproduce.py's budget flags (docs/results.md, "NLS sampling: per step or per
micro-batch"). Each mode writes ``<out>/<mode>/losses.json``; a finished mode is skipped.
``--report DIR [DIR ...]`` prints the markdown table of finished output folders.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import reproduce as rp  # noqa: E402

import shears  # noqa: E402
from shears.evaluation import evaluate_loss, instruction_dataset  # noqa: E402

NAMED = ("maximal", "heuristic", "minimal")


def split_args(argv: list[str]) -> tuple[list[str], list[str], int]:
    """(reproduce.py's arguments, the modes, --extra-records) out of ``argv``."""
    modes, extra, rest, i = ["step", "micro_batch"], 128, [], 0
    while i < len(argv):
        if argv[i] == "--modes":
            modes = [m for m in argv[i + 1].split(",") if m and m != "none"]
            i += 2
        elif argv[i] == "--extra-records":
            extra = int(argv[i + 1])
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    return rest, modes, extra


def pruned_model(args, device, dtype, data: Path, train: list[dict], out: Path):
    """reproduce.py's model, Wanda-pruned once and cached as a state dict."""
    model, tok = rp.load_model(args, device, dtype)
    path = out / "pruned.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location=device))
        return model, tok, rp.read_json(out / "pruning.json")
    pruning = rp.prune(model, tok, args, data, train, out)
    tmp = path.with_name("pruned.pt.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model, tok, pruning


def measure(model, tok, args, mode: str, train_ds, held_out: dict, out: Path) -> dict:
    """Train the super-adapter in ``mode`` and read out the named sub-adapters' losses."""
    args.nls_sample_every = mode
    start = time.perf_counter()
    log = rp.train_adapter(model, tok, args.ranks, train_ds, args, model.device, model.dtype,
                           out / mode)
    train_s = time.perf_counter() - start
    losses = {}
    for name in NAMED:
        config = getattr(shears, f"{name}_config")(model)
        shears.set_config(model, config)
        losses[name] = {k: evaluate_loss(model, rows, args.eval_batch)
                        for k, rows in held_out.items()}
    rp.strip_adapters(model)
    return {"mode": mode, "losses": losses, "train_wall_s": train_s,
            "optimizer_steps": log["optimizer_steps"], "log_history": log["log_history"]}


def report(folders: list[str]) -> str:
    """Markdown rows: per folder and sub-adapter, both modes' losses and their difference."""
    lines = ["| run | sub-adapter | held-out set (records) | `step` | `micro_batch` | "
             "micro_batch - step |", "|---|---|---|---|---|---|"]
    for folder in folders:
        runs = {m: rp.read_json(Path(folder) / m / "losses.json") for m in ("step", "micro_batch")}
        if None in runs.values():
            continue
        step, micro = runs["step"], runs["micro_batch"]
        for name in NAMED:
            for held_out, n in step["records"].items():
                if held_out == "train":
                    continue
                a, b = step["losses"][name][held_out], micro["losses"][name][held_out]
                lines.append(f"| {Path(folder).name} | {name} | {held_out} ({n}) | {a:.4f} | "
                             f"{b:.4f} | {b - a:+.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--report":
        print(report(argv[1:]))
        return
    rest, modes, extra = split_args(argv)
    args = rp.parse_args(rest)
    out = Path(args.out or rp.REPO / "outputs" / "nls-sample-every")
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = rp.pick_device(args)
    data = rp.find_data(args.data)
    _, kept, counts = rp.load_training(args.task, data)
    train, val = rp.split_training(kept, args, counts)
    model, tok, pruning = pruned_model(args, device, dtype, data, train, out)
    # Records of the pool after the training records: never trained on, not the slice.
    order_rest = rp.split_training(kept, argparse_copy(args, records=0), dict(counts))[0]
    unseen = order_rest[len(train): len(train) + extra]
    held_out = {"validation": rp.response_rows(val, tok, args.cutoff),
                "unseen_pool": rp.response_rows(unseen, tok, args.cutoff)}
    train_ds = instruction_dataset(train, tok, cutoff_len=args.cutoff)
    for mode in modes:
        path = out / mode / "losses.json"
        if path.is_file():
            continue
        result = measure(model, tok, args, mode, train_ds, held_out, out)
        result.update(records={"train": len(train), "validation": len(held_out["validation"]),
                               "unseen_pool": len(held_out["unseen_pool"] or [])},
                      sparsity=pruning["sparsity"], argv=rest)
        rp.write_json(path, result)
        print(mode, result["losses"], f"train {result['train_wall_s']:.0f} s", flush=True)


def argparse_copy(args, **changes):
    """A copy of the parsed arguments with ``changes``."""
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})


if __name__ == "__main__":
    main()
