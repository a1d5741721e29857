"""The search phases of benchmarks/search_budget.py (issue 16): does a search beat the heuristic?

* ``correlation``: the rank sensitivity's estimate against measured validation losses of
  random sub-adapters (Spearman), for every estimator.
* ``search``: heuristic, today's hill-climb, the ordered climb and front_search at budgets
  16 and 32, constrained to the heuristic's adapter parameters; validation and held-out
  test loss of each pick; the sensitivity pass's wall time against one evaluation.
* ``plot``: the estimated front and measured losses against adapter parameters (PNG).

Every validation loss goes through one judge whose chunk scores are cached on disk
(``<out>/search/chunks.jsonl``), so no configuration is evaluated twice by any search or
phase, and a rerun costs nothing; each search still counts its own budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pick_accuracy
import reproduce as rp
import torch

import shears
from shears.evaluation import InstructionCollator, evaluate_loss
from shears.search import (
    RankSensitivity,
    adapter_parameters,
    confirm_pick,
    estimated_front,
    front_search,
    make_chunked_evaluator,
    rank_sensitivity,
    stratified_batches,
)

PHASES = ("correlation", "search", "confirm", "accuracy", "plot")
BUDGETS = (16, 32)
SEARCHES = ("hill-climb", "ordered", "front")  # first words of the searches' names
# name -> rank_sensitivity arguments (the anchor is filled in from the model)
ESTIMATORS = {"tangent at maximal": {"method": "tangent"},
              "tangent at heuristic": {"method": "tangent", "anchor": "heuristic"},
              "path, 2 points": {"method": "path", "points": 2},
              "path, 3 points": {"method": "path", "points": 3}}


def key_of(config: dict[str, int]) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


class CachedJudge:
    """A chunked judge (``make_chunked_evaluator``) whose chunk scores persist in a JSONL
    file: shared by every search and phase, and by reruns."""

    def __init__(self, model, batches, path: Path) -> None:
        self.inner = make_chunked_evaluator(model, batches)
        self.batches, self.loss = self.inner.batches, self.inner.loss
        self.chunk_costs, self.path, self.memo = self.inner.chunk_costs, path, {}
        self.computed = 0  # chunks computed (not read from the file) in this run
        if path.is_file():
            for line in path.read_text().splitlines():
                e = json.loads(line)
                self.memo[e["key"], e["chunk"]] = (e["sum"], e["count"])

    def chunk(self, config, i):
        k = (key_of(dict(config)), i)
        if k not in self.memo:
            self.memo[k] = self.inner.chunk(config, i)
            self.computed += 1
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:  # an append-only log: a torn last line is redone
                f.write(json.dumps({"key": k[0], "chunk": i, "sum": self.memo[k][0],
                                    "count": self.memo[k][1]}) + "\n")
        return self.memo[k]

    def __call__(self, config) -> float:
        parts = [self.chunk(config, i) for i in range(len(self.chunk_costs))]
        return sum(s for s, _ in parts) / sum(c for _, c in parts)


def val_batches(val_rows: list[dict] | dict[str, list[dict]], tok, size: int) -> list[dict]:
    """Batches of ``size`` rows; of each stratum apart, weighed equally
    (``stratified_batches``), when ``val_rows`` maps strata to rows."""
    if isinstance(val_rows, dict):
        return stratified_batches({n: val_batches(r, tok, size) for n, r in val_rows.items()})
    collate = InstructionCollator(tok)
    return [collate(val_rows[i: i + size]) for i in range(0, len(val_rows), size)]


def rows_of(records: list[dict] | dict[str, list[dict]], tok, cutoff: int):
    """``response_rows`` of the records, or of each stratum's."""
    if isinstance(records, dict):
        return {n: rp.response_rows(r, tok, cutoff) for n, r in records.items()}
    return rp.response_rows(records, tok, cutoff)


def sensitivities(model, batches, out: Path, names=None) -> dict[str, RankSensitivity]:
    """Every estimator of ``ESTIMATORS`` (or ``names``), computed once and saved, with its
    wall time."""
    found = {}
    for name in names or ESTIMATORS:
        path = out / f"sensitivity-{name.replace(' ', '_').replace(',', '')}.json"
        if not path.is_file():
            kw = dict(ESTIMATORS[name])
            anchor = shears.heuristic_config(model) if kw.pop("anchor", None) else None
            start = time.perf_counter()
            sens = rank_sensitivity(model, batches, anchor, **kw)
            rp.write_json(path.with_suffix(".time.json"),
                          {"wall_s": time.perf_counter() - start, "pid": os.getpid()})
            sens.save(path)
        found[name] = RankSensitivity.load(path)
    return found


def spearman(a, b) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties get their mean rank)."""
    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average rank for ties
            r[x == v] = r[x == v].mean()
        return r
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def sized_configs(model, n: int, rng: np.random.Generator, low: float = 0.97) -> list[dict]:
    """``n`` random configurations within [low, 1] x the heuristic's adapter parameters
    (rejection sampling): where a search within that size has to choose."""
    limit = adapter_parameters(model, shears.heuristic_config(model))
    out = []
    for _ in range(10_000 * n):
        c = shears.random_config(model, rng)
        if low * limit <= adapter_parameters(model, c) <= limit and c not in out:
            out.append(c)
            if len(out) == n:
                break
    return out


def correlation(model, judge: CachedJudge, sens: dict, out: Path, n: int, seed: int) -> dict:
    """Estimated against measured validation loss on ``n`` seeded random configurations of
    any size, and on ``n`` of about the heuristic's size (97-100% of its parameters); the
    maximal, heuristic and minimal ones are reported apart."""
    rng = np.random.default_rng(seed)
    sets = {"any size": [shears.random_config(model, rng) for _ in range(n)],
            "heuristic's size": sized_configs(model, n, rng)}
    named = {m: getattr(shears, f"{m}_config")(model) for m in ("maximal", "heuristic",
                                                                 "minimal")}
    result = {"n": n, "seed": seed, "named": {m: judge(c) for m, c in named.items()},
              "sets": {}}
    for label, configs in sets.items():
        measured = [judge(c) for c in configs]
        entry = {"measured": measured, "params": [adapter_parameters(model, c) for c in configs],
                 "estimators": {}}
        for name, s in sens.items():
            est = [s.estimate(c) for c in configs]
            err = np.asarray(est) - np.asarray(measured)
            entry["estimators"][name] = {
                "spearman": spearman(est, measured), "estimates": est,
                "mean_error": float(err.mean()), "mean_abs_error": float(np.abs(err).mean()),
                "named": {m: s.estimate(c) for m, c in named.items()}}
            print(f"[correlation] {label}, {name}: Spearman "
                  f"{entry['estimators'][name]['spearman']:+.3f}, mean error {err.mean():+.4f}",
                  flush=True)
        result["sets"][label] = entry
    rp.write_json(out / "correlation.json", result)
    return result


def result_path(out: Path, label: str) -> Path:
    """Where the search of ``label`` ("<name> @<budget>") saves its SearchResult."""
    name, budget = label.rsplit(" @", 1)
    return out / f"search-{name.split(' ')[0]}-{budget}.json"


def searches(model, judge: CachedJudge, sens: RankSensitivity, out: Path, seed: int,
             which: tuple[str, ...] = SEARCHES, budgets: tuple[int, ...] = BUDGETS) -> dict:
    """The searches ``which`` at ``budgets`` (default all, at 16 and 32), constrained to the
    heuristic's adapter parameters."""
    heuristic = shears.heuristic_config(model)
    limit = adapter_parameters(model, heuristic)
    done = rp.read_json(out / "searches.json", {})
    done["heuristic"] = {"config": heuristic, "val": judge(heuristic), "params": limit}
    for budget in budgets:
        runs = {
            "hill-climb (today's)": lambda b=budget: shears.hill_climb(
                model, judge, budget=b, seed=seed, maximize=False, progress=False),
            "ordered climb": lambda b=budget: shears.hill_climb(
                model, judge, budget=b, seed=seed, maximize=False, progress=False,
                estimate=sens.estimate, max_params=limit),
            "front search": lambda b=budget: front_search(
                model, judge, budget=b, max_params=limit, sensitivity=sens, seed=seed,
                progress=False)}
        for name, run in runs.items():
            label = f"{name} @{budget}"
            if label in done or name.split(" ")[0] not in which:
                continue
            result = run()
            result.save(result_path(out, label))
            within = [e for e in result.history if e.params <= limit]
            pick = min(within, key=lambda e: e.score)  # the heuristic's size at most
            done[label] = {"config": pick.config, "val": pick.score, "params": pick.params,
                           "evaluations": len(result.history),
                           "spent": result.settings.get("spent", len(result.history)),
                           "best_any_size": {"val": result.best_score,
                                             "params": result.best.params}}
            print(f"[search] {label}: val {pick.score:.4f} ({pick.params:,} params)",
                  flush=True)
            rp.write_json(out / "searches.json", done)
    rp.write_json(out / "searches.json", done)
    return done


def test_losses(model, picks: dict, rows: dict, batch: int, out: Path) -> dict:
    """Held-out test loss (mean over the test sets) of every pick, cached by configuration."""
    path = out / "test_losses.json"
    cache = rp.read_json(path, {})
    for entry in picks.values():
        k = key_of(entry["config"])
        if k not in cache:
            shears.set_config(model, entry["config"])
            tests = {n: evaluate_loss(model, r, batch_size=batch) for n, r in rows.items()}
            cache[k] = {"tests": tests, "test_mean": sum(tests.values()) / len(tests)}
            rp.write_json(path, cache)
        entry["test"] = cache[k]["test_mean"]
    return picks


def confirm(model, judge: CachedJudge, rows: dict, batch: int, out: Path) -> dict:
    """Every search's pick confirmed against the heuristic on records neither the training
    nor the search's judge saw (``confirm_pick``, top 1): the confirmed sub-adapter's
    confirmation score and held-out test loss, per search."""
    heuristic = shears.heuristic_config(model)
    limit = adapter_parameters(model, heuristic)
    found = rp.read_json(out / "searches.json")
    done = {}
    for label in (k for k in found if k != "heuristic"):
        result = shears.SearchResult.load(result_path(out, label))
        c = confirm_pick(result, judge, heuristic, max_params=limit)
        done[label] = {"config": c.config, "accepted": c.accepted, "confirm": c.score,
                       "confirm_scores": c.scores, "val": c.search_score,
                       "params": adapter_parameters(model, c.config)}
        print(f"[confirm] {label}: {'accepted' if c.accepted else 'heuristic kept'} "
              f"({c.scores})", flush=True)
    test_losses(model, done, rows, batch, out)
    rp.write_json(out / "confirm.json", done)
    return done


def timing(model, judge: CachedJudge, out: Path) -> dict:
    """Wall time of one default (3-point path) sensitivity pass against one (uncached) full
    evaluation of the maximal sub-adapter. The pass's time is the one ``sensitivities``
    recorded when it computed the default estimator in this process (the pass is not run
    twice); otherwise it is timed here, after the evaluation."""
    path = out / "timing.json"
    if path.is_file():
        return rp.read_json(path)
    config = shears.maximal_config(model)
    start = time.perf_counter()
    judge.inner(config)
    one = time.perf_counter() - start
    recorded = rp.read_json(out / "sensitivity-path_3_points.time.json")
    if recorded and recorded.get("pid") == os.getpid():
        sens = recorded["wall_s"]
    else:
        start = time.perf_counter()
        rank_sensitivity(model, judge.batches, progress=False)
        sens = time.perf_counter() - start
    result = {"evaluation_s": one, "sensitivity_s": sens, "ratio": sens / one,
              "threads": torch.get_num_threads()}
    rp.write_json(path, result)
    print(f"[timing] sensitivity pass {sens:.1f} s = {sens / one:.2f} evaluations", flush=True)
    return result


def plot(model, judge: CachedJudge, sens: RankSensitivity, out: Path, points: int) -> None:
    """Estimated front, measured loss of ``points`` of its members spread by size, the
    random configurations of ``correlation`` and the searches' picks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    front = estimated_front(model, sens)
    picks = [front[int(i)] for i in np.unique(np.linspace(0, len(front) - 1, points).round())]
    measured = [judge(p.config) for p in picks]
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([p.params for p in front], [p.estimated_loss for p in front], c="tab:blue", lw=1,
            label=f"estimated front ({sens.method})")
    ax.scatter([p.params for p in picks], measured, c="tab:red", s=30, zorder=3,
               label="front members, measured")
    corr = rp.read_json(out / "correlation.json")
    for label, entry in (corr or {}).get("sets", {}).items():
        ax.scatter(entry["params"], entry["measured"], s=12, alpha=0.6,
                   label=f"random sub-adapters ({label}), measured")
    found = rp.read_json(out / "searches.json", {})
    for name, e in found.items():
        marker = "D" if name == "heuristic" else "*"
        ax.scatter([e["params"]], [e["val"]], marker=marker, s=60, zorder=4, label=name,
                   edgecolors="black")
    ax.set_xlabel("adapter parameters")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(out / "front.png", dpi=120)
    rp.write_json(out / "front.json", {"estimated": [[p.params, p.estimated_loss]
                                                     for p in front],
                                       "measured": [[p.params, m] for p, m in
                                                    zip(picks, measured, strict=True)]})


def markdown(out: Path) -> str:
    """Tables of what the search phases finished in ``out``."""
    lines = []
    corr = rp.read_json(out / "correlation.json")
    if corr:
        lines += [f"Estimate against measured validation loss, {corr['n']} random "
                  f"sub-adapters per set (seed {corr['seed']}):", "",
                  "| estimator | sub-adapters | Spearman | mean error | mean abs. error |",
                  "|---|---|---|---|---|"]
        for label, entry in corr["sets"].items():
            for name, e in entry["estimators"].items():
                lines.append(f"| {name} | {label} | {e['spearman']:+.3f} | "
                             f"{e['mean_error']:+.4f} | {e['mean_abs_error']:.4f} |")
        lines.append("")
    found = rp.read_json(out / "searches.json")
    if found:
        lines += ["| search | val loss | held-out loss | params | evaluations |",
                  "|---|---|---|---|---|"]
        for name, e in found.items():
            test = f"{e['test']:.4f}" if "test" in e else "n/a"
            spent = e.get("spent", 1)
            lines.append(f"| {name} | {e['val']:.4f} | {test} | {e['params']:,} | "
                         f"{spent:.4g} |")
        lines.append("")
    conf = rp.read_json(out / "confirm.json")
    if conf:
        lines += ["Picks confirmed against the heuristic on unseen records (`confirm_pick`):",
                  "", "| search | kept | confirmation loss (heuristic / pick) | held-out loss |",
                  "|---|---|---|---|"]
        for name, e in conf.items():
            cand = e["confirm_scores"]["candidates"]
            ref = e["confirm_scores"]["reference"]
            pair = "n/a" if ref is None else f"{ref:.4f} / {cand[0]:.4f}"
            kept = "pick" if e["accepted"] else "heuristic"
            lines.append(f"| {name} | {kept} | {pair} | {e['test']:.4f} |")
        lines.append("")
    acc = rp.read_json(out / "accuracy-summary.json")
    if acc:
        lines += ["Held-out accuracy (mean over the test sets) of the heuristic and the "
                  "confirmed picks:", "", "| sub-adapter | accuracy | right only here / only "
                  "with the heuristic | McNemar p |", "|---|---|---|---|"]
        for name, e in acc.items():
            lines.append(f"| {name} | {e['mean']:.2%} | {e['right_only_here']} / "
                         f"{e['right_only_heuristic']} | {e['mcnemar_p']:.3f} |")
        lines.append("")
    t = rp.read_json(out / "timing.json")
    if t:
        lines.append(f"Sensitivity pass {t['sensitivity_s']:.1f} s against one evaluation "
                     f"{t['evaluation_s']:.1f} s: {t['ratio']:.2f} evaluations "
                     f"({t['threads']} threads).")
    return "\n".join(lines) + "\n" if lines else ""


def run(model, tok, args, rows: dict, val_rows: list[dict], out: Path) -> None:
    """The search phases on the NLS super-adapter saved at ``args.search_step``."""
    folder = out / getattr(args, "search_dir", "search")
    folder.mkdir(parents=True, exist_ok=True)
    shears.load_adapter(model, out / "nls" / f"step-{args.search_step}")
    batches = val_batches(val_rows, tok, args.race_batch)
    judge = CachedJudge(model, batches, folder / "chunks.jsonl")
    names = list(ESTIMATORS) if "correlation" in args.phases else [args.estimator]
    sens = sensitivities(model, batches, folder, names)
    if "correlation" in args.phases:
        correlation(model, judge, sens, folder, args.correlation_configs, args.seed)
    if "search" in args.phases:
        timing(model, judge, folder)
        picks = searches(model, judge, sens[args.estimator], folder, args.seed,
                         tuple(getattr(args, "searches", SEARCHES)),
                         tuple(getattr(args, "budgets", BUDGETS)))
        test_losses(model, picks, rows, args.eval_batch, folder)
        rp.write_json(folder / "searches.json", picks)
    if "confirm" in args.phases:
        confirm_judge = CachedJudge(model, val_batches(args.confirm_rows, tok, args.race_batch),
                                    folder / "confirm-chunks.jsonl")
        confirm(model, confirm_judge, rows, args.eval_batch, folder)
    if "accuracy" in args.phases:
        pick_accuracy.accuracy(model, tok, args.test_records, args, folder)
    if "plot" in args.phases:
        plot(model, judge, sens[args.estimator], folder, args.front_points)
    print(f"[search] chunks computed in this run: {judge.computed}; {len(judge.memo)} cached "
          "in all", flush=True)
