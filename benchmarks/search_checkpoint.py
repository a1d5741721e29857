"""Cost of ``checkpoint=``: saving a search after every evaluation, against one evaluation.

    flock /tmp/shears-bench.lock python benchmarks/search_checkpoint.py --data ../shared/data

The baseline is the evaluation a search pays for, measured in the same run: the
validation loss (``evaluate_loss``) of SmolLM2-135M-Instruct (fp32, 1 thread) with elastic
adapters grouped as in the paper (Q, K, V together; Up; Down: 90 groups of [32, 24, 16]) on
the first 32 records of math_data.json (cut off at 256 tokens), as reproduce.py's judge.
The checkpoint is what ``Budget`` writes after an evaluation: the ``SearchResult`` so far
(90-group configurations, every field filled), saved atomically (temporary file, fsync,
rename, folder fsync) to ``--out``. Reported: one save of a 100-evaluation history, and
what checkpointing adds to the bookkeeping of a 100-evaluation search (``Budget`` with a
free judge, with a checkpoint minus without), each as a fraction of one evaluation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from shears.adapters import adapter_parameters, add_elastic_lora, random_config
from shears.evaluation import evaluate_loss, instruction_dataset
from shears.search import Evaluation, SearchResult, make_evaluator, search_space
from shears.search.evaluator import Budget
from shears.search.space import encode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from smollm2 import load_smollm2  # noqa: E402  (the examples' model loader)

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def history(model, n: int, seed: int = 0) -> list[Evaluation]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c = random_config(model, rng)
        out.append(Evaluation(c, float(rng.normal(1.2, 0.05)), adapter_parameters(model, c),
                              seconds=float(rng.uniform(10, 20))))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--out", default="/tmp/shears-search-checkpoint")
    p.add_argument("--evals", type=int, default=2, help="evaluations timed (median)")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok = load_smollm2()
    add_elastic_lora(model, TARGETS, ranks=(32, 24, 16), groups="qkv")
    space = search_space(model)
    records = json.loads((Path(args.data) / "llm-adapters" / "math_data.json").read_text())[:32]
    val = instruction_dataset(records, tok, cutoff_len=256, train_on_inputs=False)
    evaluate = make_evaluator(model, lambda m: evaluate_loss(m, val))
    configs = [random_config(model, i) for i in range(args.evals)]
    evals = []
    for c in configs:
        t = time.perf_counter()
        evaluate(c)
        evals.append(time.perf_counter() - t)
    one_eval = statistics.median(evals)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    full = history(model, 100)
    target = out / "checkpoint.json"
    per_save = []
    for _ in range(20):
        t = time.perf_counter()
        SearchResult(space, full, maximize=False, method="hill_climb",
                     settings={"budget": 100}).save(target)
        per_save.append(time.perf_counter() - t)
    save_100 = statistics.median(per_save)
    # What a 100-evaluation search pays: the Budget every search calls, with a free judge,
    # with and without a checkpoint (a snapshot and a save after each evaluation).
    scores = {tuple(e.config.values()): e.score for e in full}
    keys = [encode(space, e.config) for e in full]
    spent = {}
    for name, path in (("without", None), ("with", out / "budget.json"), ("without2", None)):
        judge = Budget(space, lambda c: scores[tuple(c.values())], 100, model=model,
                       maximize=False, progress=False, checkpoint=path, method="hill_climb")
        t = time.perf_counter()
        for k in keys:
            judge(k)
        judge.result()
        spent[name] = time.perf_counter() - t
    all_saves = spent["with"] - min(spent["without"], spent["without2"])

    print(f"groups {len(space)}; checkpoint of 100 evaluations: {target.stat().st_size} bytes")
    print(f"one evaluation (median of {args.evals}): {one_eval:.2f} s")
    print(f"one save, 100-evaluation history (median of 20): {1e3 * save_100:.1f} ms = "
          f"{save_100 / one_eval:.2e} of one evaluation")
    print(f"Budget, 100 free evaluations: {spent['without']:.3f} s without a checkpoint, "
          f"{spent['with']:.3f} s with one")
    print(f"all 100 saves of a 100-evaluation search: {all_saves:.2f} s = "
          f"{all_saves / one_eval:.3f} evaluations ({all_saves / (100 * one_eval):.2e} of "
          "the search's evaluation time)")


if __name__ == "__main__":
    main()
