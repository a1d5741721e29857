"""The ``accuracy`` search phase: do the confirmed picks' loss gains become right answers?

Held-out accuracy (generation with reproduce.py's decoding and answer rule) of the heuristic
and of every confirmed pick (``confirm.json``) on the evaluated test records, cached per
configuration and test set in ``accuracy.json``; and each pick against the heuristic,
paired record by record (McNemar's exact test over the records where exactly one is right).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import reproduce as rp

import shears
from shears.evaluation import evaluate_generation
from shears.evaluation.stats import mcnemar_exact


def key_of(config: dict[str, int]) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def right_answers(model, tok, config, tests: dict, args, cache: dict, path: Path) -> dict:
    """test set -> per-record correctness of ``config``, generated once and cached."""
    done = cache.setdefault(key_of(config), {})
    for task, records in tests.items():
        if task not in done:
            shears.set_config(model, config)
            result = evaluate_generation(model, tok, records, task, batch_size=args.eval_batch,
                                         max_new_tokens=args.max_new_tokens,
                                         num_beams=args.num_beams, rule=args.answer_rule)
            done[task] = [bool(r["correct"]) for r in result.records]
            rp.write_json(path, cache)
    return done


def accuracy(model, tok, tests: dict, args, out: Path) -> dict:
    """label -> mean accuracy over the test sets, per set, and the paired test against the
    heuristic; written to ``accuracy-summary.json``."""
    path = out / "accuracy.json"
    cache = rp.read_json(path, {})
    picks = {"heuristic": shears.heuristic_config(model)}
    for label, e in rp.read_json(out / "confirm.json", {}).items():
        if e["accepted"]:
            picks[label] = e["config"]
    flags = {label: right_answers(model, tok, c, tests, args, cache, path)
             for label, c in picks.items()}
    summary = {}
    for label, per_task in flags.items():
        base = flags["heuristic"]
        wins = sum(a and not b for t in per_task for a, b in zip(per_task[t], base[t], strict=True))
        losses = sum(b and not a for t in per_task for a, b in zip(per_task[t], base[t],
                                                                     strict=True))
        acc = {t: sum(f) / len(f) for t, f in per_task.items()}
        summary[label] = {"mean": sum(acc.values()) / len(acc), "tests": acc,
                          "right_only_here": wins, "right_only_heuristic": losses,
                          "mcnemar_p": mcnemar_exact(wins, losses)}
        print(f"[accuracy] {label}: mean {summary[label]['mean']:.2%} ({wins} records right "
              f"only here, {losses} only with the heuristic)", flush=True)
    rp.write_json(out / "accuracy-summary.json", summary)
    return summary
