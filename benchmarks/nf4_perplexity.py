"""Perplexity of the Wanda-50% SmolLM2 reloaded in bitsandbytes NF4, against the same pruned
model unquantized, in one run.

    python benchmarks/nf4_perplexity.py --data ../shared/data [--windows 40] [--threads 1]

The protocol of bench_prune.py (issue #2): WikiText-2 test tokenized as one string; 32
calibration windows of 256 tokens drawn (seed 0) from the second half; Wanda 50% (shears,
batch 1) on the fp32 model; perplexity over the first ``--windows`` non-overlapping
512-token windows of the first half. The pruned model is saved and reloaded with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` (compute dtype fp32;
every decoder linear map in NF4, lm_head not), twice: as bitsandbytes runs it by default on
CPU (at the first forward without grad it repacks the weights for its AVX512-BF16 kernel,
absmax in bf16, where the CPU has one) and in the layout shears keeps under adapters
(``keep_trainable_layout``: fp32 absmax, dequantize then matmul).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers as T

from shears import wanda_prune
from shears.evaluation.perplexity import perplexity
from shears.quantization.bnb import dequantized_weight, is_bnb_4bit, keep_trainable_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from smollm2 import load_smollm2  # noqa: E402  (the examples' model loader)
from wikitext_protocol import protocol_ids  # noqa: E402  (benchmarks/, on sys.path)


def nf4(path: Path, trainable_layout: bool) -> torch.nn.Module:
    q = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_compute_dtype=torch.float32)
    model = T.AutoModelForCausalLM.from_pretrained(path, quantization_config=q).eval()
    if trainable_layout:
        for m in model.modules():
            if is_bnb_4bit(m):
                keep_trainable_layout(m)
    return model


def zeros_kept(fp: torch.nn.Module, q: torch.nn.Module) -> tuple[int, int]:
    """(pruned zeros of the 4-bit maps, how many of them are exact zeros after NF4)."""
    pruned = kept = 0
    for name, m in q.named_modules():
        if is_bnb_4bit(m):
            zero = fp.get_submodule(name).weight == 0
            pruned += int(zero.sum())
            kept += int((dequantized_weight(m)[zero] == 0).sum())
    return pruned, kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    ids, calib, ppl_ids = protocol_ids(tok, args.data)

    def ppl(m):
        return perplexity(m, ppl_ids, 512, max_windows=args.windows, progress=False)

    wanda_prune(model, calib, sparsity=0.5, progress=False)
    results = {"wanda 50% fp32": ppl(model)}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        q = nf4(Path(tmp), trainable_layout=True)
        pruned, kept = zeros_kept(model, q)
        results["wanda 50% NF4 (trainable layout, as under adapters)"] = ppl(q)
        del q
        results["wanda 50% NF4 (bitsandbytes' default CPU inference)"] = ppl(
            nf4(Path(tmp), trainable_layout=False))
    base = results["wanda 50% fp32"]
    for name, value in results.items():
        print(f"| {name} | {value:.2f} | {value / base:.3f} |")
    print(f"pruned zeros of the NF4 maps kept exactly: {kept} of {pruned}; windows "
          f"{args.windows} x 512; torch threads {torch.get_num_threads()}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"perplexity": results, "zeros": {"pruned": pruned, "kept": kept},
             "windows": args.windows, "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
