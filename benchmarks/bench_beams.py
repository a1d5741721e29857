"""What the reference's 4-beam search costs against greedy decoding, and what it changes.

    python benchmarks/bench_beams.py --data ../shared/data --threads 1

SmolLM2-135M-Instruct (fp32), the first ``--records`` GSM8K test records in the LLM-Adapters
prompt, ``--max-new-tokens`` new tokens, ``evaluate_generation`` at batch ``--batch``: once
greedy (``num_beams=1``), once with 4 beams, in this process after a short warm-up. Reports
the process CPU time of each (the figure that does not depend on other jobs on the cores)
and its ratio, how many responses and extracted answers differ, and the accuracy under
both answer rules.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from shears.evaluation import evaluate_generation, extract_answer, is_correct, load_task

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from smollm2 import load_smollm2  # noqa: E402  (the examples' model loader)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="folder holding llm-adapters/")
    p.add_argument("--records", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    opts = p.parse_args(argv)
    torch.set_num_threads(opts.threads)
    model, tok = load_smollm2()
    records = load_task("gsm8k", opts.data, limit=opts.records)
    evaluate_generation(model, tok, records[:2], "gsm8k", max_new_tokens=4, num_beams=4,
                        progress=False)  # warm-up
    runs = {}
    for beams in (1, 4):
        wall, cpu = time.perf_counter(), time.process_time()
        runs[beams] = evaluate_generation(model, tok, records, "gsm8k", batch_size=opts.batch,
                                          max_new_tokens=opts.max_new_tokens, num_beams=beams,
                                          progress=False)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(f"num_beams={beams}: CPU {cpu:.1f} s, wall {wall:.1f} s")
        runs[beams].cpu = cpu
    greedy, beam = runs[1].records, runs[4].records
    print(f"CPU ratio 4 beams / greedy: {runs[4].cpu / runs[1].cpu:.2f}")
    differ = sum(g["output"] != b["output"] for g, b in zip(greedy, beam, strict=True))
    print(f"responses that differ: {differ} of {len(records)}")
    for rule in ("shears", "llm-adapters"):
        for beams, rows in runs.items():
            answers = [extract_answer(r["output"], "gsm8k", rule) for r in rows.records]
            right = sum(is_correct(a, r["label"], "gsm8k")
                        for a, r in zip(answers, rows.records, strict=True))
            print(f"rule {rule}, num_beams={beams}: {right}/{len(records)} right")


if __name__ == "__main__":
    main()
