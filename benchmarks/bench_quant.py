"""INT4 round-to-nearest on the (Wanda-pruned) base: perplexity and disk size, one run.

    python benchmarks/bench_quant.py --data ../shared/data [--windows 40] [--json out.json]

SmolLM2-135M-Instruct, fp32, CPU; the protocol of bench_prune.py (issue #2): WikiText-2
test tokenized as one string; 32 calibration windows of 256 tokens drawn (seed 0) from the
second half; perplexity over the first ``--windows`` non-overlapping 512-token windows of
the first half. Rows: dense, dense + INT4 (group 64, 32), Wanda 50% (shears, batch 1),
Wanda 50% + INT4 (group 64, 32). SmolLM2's hidden size 576 is not a multiple of 128, so
group 128 does not apply. Every quantized row is ``quantize_base`` (symmetric, per group,
round to nearest) on a copy of the same dense or pruned model.

``--step-time`` instead times one training step (forward + backward, batch 2 x 128 tokens,
maximal sub-adapter, Q/K/V/Up/Down, magnitude-pruned 50% so that no calibration is needed)
of ``sparse_adapter=True`` adapters over the fp32 sparse base against the same adapters over
the INT4 g64 base (QA-SparsePEFT), alternating, median of ``--repeats``, same process.

``--qa-loss`` instead compares, at one NLS budget (same data, steps, seed; sparse adapters,
Q/K/V/Up/Down, ranks 32/24/16, groups "qkv", lr 3e-4, LLM-Adapters math_data.json, the
heuristic sub-adapter), the held-out loss of (a) adapters trained on the fp32 Wanda base,
merged, then quantized after the fact (INT4 g64), and (b) QA-SparsePEFT: quantized first,
trained on the grid, merged; with the Wanda base and the Wanda + INT4 base as references.
This is SQFT's claim that (b) recovers what (a) loses. ``--nf4`` runs side (c) instead: the
same adapters and NLS over the Wanda model reloaded in bitsandbytes NF4, unmerged.

Disk: the Wanda 50% model written three ways (``save_pretrained`` fp32 and bf16, and
``export_compressed`` of the bf16 model quantized with each group size): the whole
``model.safetensors`` and the decoder's linear maps alone (read back from the file).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from shears import export_compressed, quantize_base, wanda_prune
from shears.evaluation.perplexity import perplexity
from shears.quantization import quantized_modules

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from smollm2 import load_smollm2  # noqa: E402  (the examples' model loader)
from wikitext_protocol import protocol_ids  # noqa: E402  (benchmarks/, on sys.path)

GROUPS = (64, 32)


def ppl(model, ids, windows: int) -> float:
    return perplexity(model, ids, 512, max_windows=windows, progress=False)


def quantized_rows(name: str, model, ids, windows: int, groups=GROUPS) -> dict[str, float]:
    rows = {name: ppl(model, ids, windows)}
    for g in groups:
        q = copy.deepcopy(model)
        report = quantize_base(q, bits=4, group_size=g)
        rows[f"{name} + INT4 g{g}"] = ppl(q, ids, windows)
        print(f"  {name} + INT4 g{g}: sparsity {report.sparsity_before:.4f} -> "
              f"{report.sparsity_after:.4f}, relative error {report.relative_error:.4f}",
              flush=True)
    return rows


def file_bytes(path: Path, decoder: set[str]) -> dict[str, int]:
    """Bytes of the safetensors file, and of the tensors of the decoder's linear maps."""
    maps = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if key.rsplit(".", 1)[0] in decoder:
                t = f.get_tensor(key)
                maps += t.numel() * t.element_size()
    return {"file": path.stat().st_size, "decoder_linear": maps}


def disk_sizes(pruned) -> dict[str, dict[str, int]]:
    decoder = set(quantized_modules(_quantized(pruned, GROUPS[0])))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, dtype in (("merged fp32 (save_pretrained)", torch.float32),
                             ("merged bf16 (save_pretrained)", torch.bfloat16)):
            m = copy.deepcopy(pruned).to(dtype)
            m.save_pretrained(tmp / label)
            out[label] = file_bytes(tmp / label / "model.safetensors", decoder)
        for g in GROUPS:
            label = f"INT4 g{g} bf16 (export_compressed)"
            export_compressed(_quantized(copy.deepcopy(pruned).to(torch.bfloat16), g),
                              tmp / label)
            out[label] = file_bytes(tmp / label / "model.safetensors", decoder)
    return out


def _quantized(model, group_size: int):
    model = copy.deepcopy(model)
    quantize_base(model, bits=4, group_size=group_size)
    return model


def step_time(repeats: int) -> dict[str, float]:
    """Median seconds of one forward + backward, sparse adapters without and with the grid."""
    import time

    from shears import add_elastic_lora

    base, _ = load_smollm2()
    wanda_prune(base, method="magnitude", sparsity=0.5, progress=False)
    models = {"SparsePEFT (fp32 base)": base, "QA-SparsePEFT (INT4 g64 base)": _quantized(base, 64)}
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    for m in models.values():
        add_elastic_lora(m, targets, groups="qkv", sparse_adapter=True)
        m.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (2, 128), generator=g)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats + 1):  # the first round warms up
        for name, m in models.items():
            start = time.perf_counter()
            m(input_ids=ids, labels=ids).loss.backward()
            times[name].append(time.perf_counter() - start)
            m.zero_grad(set_to_none=True)
    med = {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in times.items()}
    first = next(iter(med))
    print("| adapters (maximal, Q/K/V/Up/Down) | step (fwd + bwd) | vs SparsePEFT |\n|---|---|---|")
    for name, t in med.items():
        print(f"| {name} | {t:.3f} s | {t / med[first]:.3f}x |")
    return med


def qa_loss(model, tok, args) -> dict[str, float]:
    """Held-out loss of (a) merge-then-quantize and (b) QA-SparsePEFT, one NLS budget."""
    import sqft  # examples/sqft.py: its train() is the QA-NLS of the example

    from shears import heuristic_config, merge_adapters
    from shears.evaluation import evaluate_loss, instruction_dataset
    from shears.evaluation.paths import data_dir

    records = json.loads((data_dir(args.data) / "llm-adapters" / "math_data.json").read_text())
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0)).tolist()
    train = [records[i] for i in order[: args.records]]
    val = instruction_dataset([records[i] for i in order[-32:]], tok, cutoff_len=args.cutoff)
    nls = argparse.Namespace(ranks=[32, 24, 16], micro_batch=4, batch_size=8,
                             steps=args.steps, cutoff=args.cutoff, lr=args.lr)
    rows = {"Wanda 50%": evaluate_loss(model, val)}
    rows["Wanda 50% + INT4 g64"] = evaluate_loss(_quantized(model, 64), val)
    sides = (("(a) sparse adapters, merged, then INT4 g64", False),
             ("(b) QA-SparsePEFT on INT4 g64, merged", True))
    if args.nf4:
        rows.update(nf4_side(model, tok, train, nls, val))
        sides = ()
    for label, first_quantize in sides[1:] if args.only_qa else sides:
        m = _quantized(model, 64) if first_quantize else copy.deepcopy(model)
        torch.manual_seed(0)  # same adapter initialisation for both
        with tempfile.TemporaryDirectory() as tmp:
            sqft.train(m, tok, train, nls, Path(tmp))
        merge_adapters(m, heuristic_config(m))
        if not first_quantize:
            rows[label.split(",")[0] + ", merged (fp32)"] = evaluate_loss(m, val)
            quantize_base(m, bits=4, group_size=64)
        rows[label] = evaluate_loss(m, val)
    print(f"| held-out loss ({args.steps} NLS steps of 8, lr {args.lr}, {len(val)} records) "
          "| value |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:.4f} |", flush=True)
    return rows


def _nf4_copy(model, folder: Path):
    """``model`` saved and reloaded with bitsandbytes NF4 (fp32 compute on the CPU)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not (folder / "config.json").is_file():
        model.save_pretrained(folder)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=q)


def nf4_side(model, tok, train, nls, val) -> dict[str, float]:
    """(c): the same sparse adapters and NLS (examples/sqft.py's train) over the Wanda model
    reloaded in NF4, kept unmerged (a 4-bit base cannot be merged); the heuristic
    sub-adapter. Two reloads: bitsandbytes repacks a 4-bit map on this CPU at its first
    no-grad forward, after which adapters refuse it (docs/quantization.md)."""
    import sqft

    from shears import heuristic_config, set_config
    from shears.evaluation import evaluate_loss

    with tempfile.TemporaryDirectory() as tmp:
        rows = {"Wanda 50% + NF4": evaluate_loss(_nf4_copy(model, Path(tmp) / "w"), val)}
        m = _nf4_copy(model, Path(tmp) / "w")
        torch.manual_seed(0)  # the adapter initialisation of (a) and (b)
        sqft.train(m, tok, train, nls, Path(tmp))
    set_config(m, heuristic_config(m))
    rows["(c) sparse adapters over NF4, unmerged"] = evaluate_loss(m, val)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="data folder (default $SHEARS_DATA_DIR)")
    p.add_argument("--windows", type=int, default=40, help="512-token perplexity windows")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--groups", type=int, nargs="+", default=list(GROUPS), help="group sizes")
    p.add_argument("--dense-int4", type=int, default=1, help="0: no dense + INT4 rows")
    p.add_argument("--disk", type=int, default=1, help="0: skip the disk sizes")
    p.add_argument("--step-time", action="store_true", help="time a QA training step only")
    p.add_argument("--repeats", type=int, default=5, help="--step-time: timed rounds")
    p.add_argument("--qa-loss", action="store_true", help="(a) vs (b) held-out loss only")
    p.add_argument("--steps", type=int, default=16, help="--qa-loss: optimizer steps")
    p.add_argument("--records", type=int, default=256, help="--qa-loss: training records")
    p.add_argument("--cutoff", type=int, default=128, help="--qa-loss: tokens per record")
    p.add_argument("--lr", type=float, default=3e-4, help="--qa-loss: learning rate")
    p.add_argument("--only-qa", action="store_true", help="--qa-loss: side (b) only")
    p.add_argument("--nf4", action="store_true", help="--qa-loss: side (c) only (NF4 base)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step_time:
        med = step_time(args.repeats)
        if args.json:
            Path(args.json).write_text(json.dumps(med, indent=2))
        return
    model, tok = load_smollm2()
    ids, calib, ppl_ids = protocol_ids(tok, args.data)
    print(f"WikiText-2 test: {ids.numel()} tokens; calibration {tuple(calib.shape)}; "
          f"{args.windows} windows; torch threads {torch.get_num_threads()}", flush=True)
    if args.qa_loss:
        wanda_prune(model, calib, 0.5, progress=False)
        rows = qa_loss(model, tok, args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return
    rows = quantized_rows("dense", model, ppl_ids, args.windows,
                          args.groups if args.dense_int4 else ())
    wanda_prune(model, calib, 0.5, progress=False)
    rows.update(quantized_rows("Wanda 50%", model, ppl_ids, args.windows, args.groups))
    print("| model | WikiText-2 perplexity |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:.2f} |")
    if not args.disk:
        if args.json:
            Path(args.json).write_text(json.dumps({"perplexity": rows,
                                                   "windows": args.windows}, indent=2))
        return
    sizes = disk_sizes(model)
    bf16 = sizes["merged bf16 (save_pretrained)"]
    print("| way out (Wanda 50%) | model.safetensors | decoder linear maps | vs bf16 maps |\n"
          "|---|---|---|---|")
    for label, s in sizes.items():
        print(f"| {label} | {s['file'] / 2**20:.1f} MiB | {s['decoder_linear'] / 2**20:.1f} MiB"
              f" | {s['decoder_linear'] / bf16['decoder_linear']:.3f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"perplexity": rows, "disk": sizes,
                                               "windows": args.windows}, indent=2))


if __name__ == "__main__":
    main()
