"""A search judge stratified as the held-out mean is (issue 16): one stratum per test set.

The held-out loss that results.md reports is the mean over the test sets of each set's
token-mean loss, so every test set weighs the same. A judge drawn from the training pool
weighs its tasks as the pool holds them instead: on math, AQuA is 4% of the pool and a
sixth of the held-out mean, and every search pick that lost on held-out data lost on AQuA.

``stratified_records`` gives each test set ``s`` a stratum of records that neither the
training nor the held-out evaluation sees: the unseen pool records that are problems of
``s`` (math_data.json holds 80% of the math test problems), then the test set's own held-out
records beyond the ``--eval-records`` evaluated ones (a development slice; on commonsense,
whose pool holds no piqa, social_i_qa or winogrande, these are all of it). Each stratum
splits into judge and confirmation records in the ratio of ``--judge-records`` to
``--confirm-records``; ``shears.stratified_batches`` then weighs the strata equally.
"""

from __future__ import annotations

import numpy as np
import reproduce as rp

from shears.evaluation import load_task


def members(records: list[dict], of: list[dict]) -> list[dict]:
    """The records whose problem occurs in ``of`` (reproduce's overlap rule)."""
    outside = {id(r) for r in rp.drop_overlap(records, of)}
    return [r for r in records if id(r) not in outside]


def candidates(name: str, unseen: list[dict], evaluated: list[dict], raw: list[dict], data,
               seed: int) -> list[dict]:
    """Stratum ``name``'s records: unseen pool problems of that test set, then its held-out
    records (none in the training file) that the evaluation does not score, seeded order."""
    test = load_task(name, data)
    spare = rp.drop_overlap(rp.drop_overlap(test, raw), evaluated)
    spare = [spare[i] for i in np.random.default_rng(seed).permutation(len(spare))]
    own = [dict(r, task=name) for r in members(unseen, test) + spare]
    return [r for r in own if rp.rationale_is_right(r, name)]


def stratified_records(unseen: list[dict], tests: dict[str, list[dict]], raw: list[dict],
                       data, args) -> tuple[dict, dict, dict]:
    """(judge strata, confirmation strata, counts): test set -> records, as the module says.

    ``unseen``: pool records that share no problem with the training records; ``tests``:
    the evaluated records per test set; ``raw``: the whole training file. A test set none
    of whose evaluated records has a right reference response (mawps: no responses) is not
    in the held-out mean, so it gets no stratum either."""
    evaluated = [r for recs in tests.values() for r in recs]
    tests = {n: recs for n, recs in tests.items()
             if any(rp.rationale_is_right(r, n) for r in recs)}
    per_judge = args.judge_records // len(tests)
    per_confirm = args.confirm_records // len(tests)
    judge, confirm, counts, used = {}, {}, {}, []
    for name in tests:
        found = candidates(name, unseen, evaluated, raw, data, args.seed)
        k = min(per_judge, round(len(found) * per_judge / (per_judge + per_confirm)))
        judge[name] = found[:k]
        used += found[:k]
        counts[name] = {"candidates": len(found), "judge": k}
    for name in tests:  # a problem judged in one stratum is confirmed in none
        found = rp.drop_overlap(candidates(name, unseen, evaluated, raw, data, args.seed), used)
        confirm[name] = found[:per_confirm]
        counts[name]["confirmation"] = len(confirm[name])
        if not judge[name] or not confirm[name]:
            raise SystemExit(f"stratum {name}: {counts[name]} records; no judge is possible")
    return judge, confirm, counts
