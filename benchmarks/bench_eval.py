"""Batched generation accuracy against a one-record-at-a-time ``model.generate`` loop.

    flock /tmp/shears-bench.lock python benchmarks/bench_eval.py --data ../shared/data

Protocol (issue #4): SmolLM2-135M-Instruct (fp32), the first 64 GSM8K test records in the
LLM-Adapters prompt, greedy, 128 new tokens. ``evaluate_generation`` at batch 16 (left
padding, KV cache, prompts grouped by length) against a plain loop that calls
``model.generate`` on one unpadded prompt at a time; both in this run, after a warm-up.
Agreement counts records whose extracted answers (and, separately, whole responses) are
identical. For each disagreement the script finds where the two token streams part and
reports the top-2 logit margin there and how far the padded batch's logits for the same
prefix are from the unpadded ones: a margin of the order of that difference means fp32
rounding of the padded batch, not a bug.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from shears.evaluation import (
    InstructionCollator,
    evaluate_generation,
    extract_answer,
    format_prompt,
    load_task,
)
from shears.evaluation.generation import STOP_MARKER

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from smollm2 import load_smollm2  # noqa: E402  (the examples' model loader)


def one_at_a_time(model, tok, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The baseline: ``model.generate`` per prompt, no padding (LLM-Adapters' evaluate.py)."""
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        new = seq[0, ids.shape[1]:].tolist()
        out.append(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new)
    return out


@torch.no_grad()
def divergence(model, tok, prompts, batch_tokens, single_tokens, i, batch_rows) -> str:
    """Where record i's two generations part, the top-2 margin there (unpadded logits), and
    max |logit difference| at that step between unpadded and left-padded (as in its batch)."""
    a, b = batch_tokens[i], single_tokens[i]
    k = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a),
                                                                                     len(b)))
    prefix = tok(prompts[i]).input_ids + b[:k]
    longest = max(len(tok(prompts[j]).input_ids) for j in batch_rows) + k
    batch = InstructionCollator(tok, padding_side="left")([{"input_ids": prefix}])
    pad = InstructionCollator(tok, pad_to_multiple_of=longest, padding_side="left")(
        [{"input_ids": prefix}])
    plain = model(**batch).logits[0, -1]
    padded = model(**pad).logits[0, -1]
    top2 = plain.topk(2).values
    return (f"record {i}: parts at new token {k}; top-2 margin {float(top2[0] - top2[1]):.2e}; "
            f"padded vs unpadded max |dlogit| {float((plain - padded).abs().max()):.2e} "
            f"({longest - len(prefix)} pad tokens)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.environ.get("SHEARS_DATA_DIR", "../shared/data"))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    data = Path(args.data)
    data = data / "llm-adapters" if (data / "llm-adapters").is_dir() else data

    torch.manual_seed(0)
    model, tok = load_smollm2()
    records = load_task("gsm8k", data, limit=args.n)
    prompts = [format_prompt(r["instruction"], r.get("input")) for r in records]
    one_at_a_time(model, tok, prompts[:1], 8)  # warm-up (allocator, kernels)

    t0 = time.perf_counter()
    result = evaluate_generation(model, tok, records, "gsm8k", batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens, progress=False)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = one_at_a_time(model, tok, prompts, args.max_new_tokens)
    t_single = time.perf_counter() - t0

    texts = [t.split(STOP_MARKER)[0].strip()
             for t in tok.batch_decode(single, skip_special_tokens=True)]
    preds = [extract_answer(t, "gsm8k") for t in texts]
    same_pred = sum(p == r["prediction"] for p, r in zip(preds, result.records, strict=True))
    same_text = sum(t == r["output"] for t, r in zip(texts, result.records, strict=True))
    acc_single = sum(
        p is not None and abs(p - float(r["answer"])) <= 1e-3
        for p, r in zip(preds, records, strict=True)) / len(records)

    n, bs = len(records), args.batch_size
    print(f"\nSmolLM2-135M-Instruct fp32, {n} GSM8K prompts, {args.max_new_tokens} new tokens, "
          f"greedy, {torch.get_num_threads()} threads")
    print("| method | wall time (s) | records/s | accuracy |")
    print("| --- | --- | --- | --- |")
    print(f"| evaluate_generation, batch {bs} | {t_batched:.1f} | {n / t_batched:.2f} | "
          f"{result.accuracy:.3f} |")
    print(f"| model.generate, one at a time | {t_single:.1f} | {n / t_single:.2f} | "
          f"{acc_single:.3f} |")
    print(f"\nspeed-up {t_single / t_batched:.2f}x; identical predictions {same_pred}/{n} "
          f"({same_pred / n:.1%}); identical responses {same_text}/{n}")

    mismatched = [i for i in range(n) if texts[i] != result.records[i]["output"]]
    if mismatched:
        from shears.evaluation import generate_tokens

        batched = generate_tokens(model, tok, prompts, bs, args.max_new_tokens, progress=False)
        order = sorted(range(n), key=lambda i: -len(tok(prompts[i]).input_ids))
        batch_of = {i: order[s : s + bs] for s in range(0, n, bs) for i in order[s : s + bs]}
        for i in mismatched:
            print(divergence(model, tok, prompts, batched, single, i, batch_of[i]))


if __name__ == "__main__":
    main()
