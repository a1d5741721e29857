"""Does NLS close the gap to LoRA with budget, and does the search beat the heuristic?

Issue 16's measurement on examples/reproduce.py's pieces (its flags apply: data split,
validation slice, held-out tests, Wanda, adapters, authors' defaults):

* ``train``: one Wanda-pruned model; LoRA r=32 and the NLS super-adapter [32, 24, 16]
  trained on the same records for ``--steps`` optimizer steps (cosine, no warm-up, a
  sub-adapter per micro-batch), the adapters saved at every step of ``--save-at`` and at
  the end (``<out>/<lora|nls>/step-<n>``). Trainer checkpoints make a killed run resume.
* ``curve``: validation and held-out test loss (response tokens of the test sets'
  reference responses whose answer is right) of LoRA and of the NLS maximal, heuristic and
  minimal sub-adapters at every saved step.
* ``base``: the same losses of the pruned model without adapters (how much of a better
  base survives fine-tuning, issue 18).
* ``correlation``, ``search``, ``confirm``, ``plot`` (benchmarks/search_phases.py), on the NLS
  super-adapter of ``--search-step``: the rank sensitivity's estimate against measured
  validation losses of ``--correlation-configs`` random sub-adapters; heuristic, today's
  hill-climb, the ordered climb and front_search at budgets 16 and 32 within the
  heuristic's adapter parameters, with validation and held-out test loss; the sensitivity
  pass's wall time against one evaluation; each pick confirmed against the heuristic on
  ``--confirm-records`` unseen records (``confirm_pick``); the estimated and measured front
  as a PNG. ``--judge-records`` widens the judge beyond the 32-record validation slice
  (``--search-dir`` keeps each judge's results apart).

    flock /tmp/shears-long.lock python benchmarks/search_budget.py --task math \\
      --data ../shared/data --out outputs/search-math --phases train,curve
    python benchmarks/search_budget.py --task math --data ../shared/data \\
      --out outputs/search-math --phases correlation,search,plot

``--report`` prints the markdown tables of what is finished.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import judge_strata  # noqa: E402
import reproduce as rp  # noqa: E402
import search_phases  # noqa: E402

import shears  # noqa: E402
from shears.evaluation import InstructionCollator, evaluate_loss, instruction_dataset  # noqa: E402

NAMED = ("maximal", "heuristic", "minimal")
# reproduce.py's arguments for this measurement: docs/results.md's budget, the authors'
# defaults (cosine, micro-batch sampling), 3x the steps.
BASE = ["--epochs", "1", "--val-records", "32", "--nsamples", "32", "--calib-seqlen", "256",
        "--threads", "1", "--lr-scheduler", "cosine", "--nls-sample-every", "micro_batch"]


def parse(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=["math", "commonsense"], default="math")
    p.add_argument("--data", default=None)
    p.add_argument("--out", required=False)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--save-at", default="40,80", help="steps at which adapters are saved too")
    p.add_argument("--eval-records", type=int, default=40, help="held-out records per test set")
    p.add_argument("--phases", default="train,curve",
                   help="any of base, train, curve, correlation, search, confirm, accuracy, plot")
    p.add_argument("--search-step", type=int, default=None,
                   help="saved NLS step the search phases use (default: the last)")
    p.add_argument("--estimator", default="path, 3 points",
                   choices=list(search_phases.ESTIMATORS), help="the searches' estimate")
    p.add_argument("--race-batch", type=int, default=4,
                   help="validation records per batch, i.e. per chunk of the race")
    p.add_argument("--correlation-configs", type=int, default=20)
    p.add_argument("--front-points", type=int, default=8,
                   help="members of the estimated front measured for the plot")
    p.add_argument("--judge-records", type=int, default=0,
                   help="records the search phases judge and estimate on: the validation "
                   "slice, then unseen pool records after the training ones (0: the slice)")
    p.add_argument("--judge-strata", action="store_true",
                   help="judge and confirm on one stratum per test set, weighed equally "
                   "(benchmarks/judge_strata.py); --judge-records then counts all strata")
    p.add_argument("--searches", default=",".join(search_phases.SEARCHES),
                   help="which of hill-climb, ordered, front the search phase runs")
    p.add_argument("--confirm-records", type=int, default=96,
                   help="unseen records (none in the judge) the confirm phase scores on")
    p.add_argument("--budgets", default="16,32", help="the searches' evaluation budgets")
    p.add_argument("--search-dir", default="search",
                   help="folder under --out for the search phases (one per judge)")
    p.add_argument("--adapters", default="lora,nls",
                   help="which of lora, nls the phases train and measure")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, seconds")
    p.add_argument("--report", nargs="*", default=None, help="output folders to tabulate")
    a, rest = p.parse_known_args(argv)
    steps = 2 if a.smoke else a.steps
    flags = [*BASE, "--task", a.task, "--records", str(16 * steps), "--steps", str(steps),
             "--eval-records", str(a.eval_records), *rest]
    if a.data:
        flags += ["--data", a.data]
    if a.smoke:
        flags = ["--smoke", "--steps", str(steps), "--nls-sample-every", "micro_batch"]
        a.save_at = "1"
        a.race_batch = 1  # 4 validation records: 4 chunks to race on
    args = rp.parse_args(flags)
    args.save_at = sorted({int(s) for s in a.save_at.split(",") if s} | {steps})
    args.phases = a.phases.split(",")
    unknown = set(args.phases) - {"base", "train", "curve", *search_phases.PHASES}
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}")
    args.search_step = a.search_step or steps
    args.adapters = a.adapters.split(",")
    a.searches = tuple(a.searches.split(","))
    a.budgets = tuple(int(b) for b in a.budgets.split(","))
    if set(a.searches) - set(search_phases.SEARCHES):
        p.error(f"--searches takes {', '.join(search_phases.SEARCHES)}, not {a.searches}")
    if not args.adapters or set(args.adapters) - {"lora", "nls"}:
        p.error(f"--adapters takes lora and/or nls, not {a.adapters!r}")
    for name in ("estimator", "race_batch", "correlation_configs", "front_points",
                 "judge_records", "confirm_records", "search_dir", "searches", "budgets",
                 "judge_strata"):
        setattr(args, name, getattr(a, name))
    args.out = Path(a.out or rp.REPO / "outputs" / f"search-{a.task}{'-smoke' * a.smoke}")
    return args, a.report


class SaveAdaptersAt(TrainerCallback):
    """``save_adapter`` at the given optimizer steps (after the update of that step)."""

    def __init__(self, model, folder: Path, steps: list[int]) -> None:
        self.model, self.folder, self.steps = model, folder, set(steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            target = self.folder / f"step-{state.global_step}"
            shears.save_adapter(self.model, target)
            rp.write_json(target / "done.json", {"step": state.global_step,
                                                 "log_history": state.log_history})


def train(model, tok, ranks, train_ds, args, folder: Path) -> None:
    """Train adapters of ``ranks`` for ``args.steps``, saving at ``args.save_at``; resumes
    from the newest Trainer checkpoint. Leaves the final adapters attached."""
    final = folder / f"step-{args.steps}"
    torch.manual_seed(args.seed)  # LoRA and NLS start from the same A (same shape at r_max)
    shears.add_elastic_lora(model, args.targets, ranks=ranks, alpha=args.alpha,
                            dropout=args.dropout, groups="qkv")
    if (final / "done.json").is_file():
        shears.load_adapter(model, final)
        return
    targs = TrainingArguments(
        output_dir=str(folder / "trainer"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.batch_size // args.micro_batch,
        learning_rate=args.lr, max_steps=args.steps, warmup_steps=0,
        lr_scheduler_type=args.lr_scheduler, optim="adamw_torch", weight_decay=0.0,
        logging_steps=max(1, args.steps // 40), save_strategy="steps",
        save_steps=max(1, args.steps // 12), save_total_limit=1, report_to=[],
        seed=args.seed, data_seed=args.seed, use_cpu=True)
    trainer = shears.NLSTrainer(model=model, args=targs, train_dataset=train_ds,
                                data_collator=InstructionCollator(tok), nls_seed=args.seed,
                                nls_sample_every=args.nls_sample_every,
                                callbacks=[SaveAdaptersAt(model, folder, args.save_at)])
    resume = any((folder / "trainer").glob("checkpoint-*"))
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    rp.write_json(folder / "train_time.json", {"wall_s": time.perf_counter() - start,
                                               "resumed": resume})
    model.eval()


def loss_rows(args, tests, val, tok):
    rows = {n: rp.response_rows([r for r in recs if rp.rationale_is_right(r, n)], tok,
                                args.cutoff) for n, recs in tests.items()}
    return {n: r for n, r in rows.items() if r}, rp.response_rows(val, tok, args.cutoff)


def losses(model, rows: dict, val, batch: int) -> dict:
    """Validation loss, and held-out loss per test set and their mean."""
    test = {n: evaluate_loss(model, r, batch_size=batch) for n, r in rows.items()}
    return {"val": evaluate_loss(model, val, batch_size=batch), "tests": test,
            "test_mean": sum(test.values()) / len(test)}


def curve(model, kind: str, args, rows, val, out: Path) -> None:
    """Losses of every saved step of ``kind`` (LoRA, or the NLS named sub-adapters)."""
    path = out / f"curve-{kind}.json"
    done = rp.read_json(path, {})
    for step in args.save_at:
        if str(step) in done:
            continue
        shears.load_adapter(model, out / kind / f"step-{step}")
        configs = {"r32": None} if kind == "lora" else {
            n: getattr(shears, f"{n}_config")(model) for n in NAMED}
        entry = {}
        for name, config in configs.items():
            if config is not None:
                shears.set_config(model, config)
            entry[name] = losses(model, rows, val, args.eval_batch)
            entry[name]["params"] = shears.adapter_parameters(model)
            print(f"[curve] {kind} step {step} {name}: val {entry[name]['val']:.4f} "
                  f"test {entry[name]['test_mean']:.4f}", flush=True)
        done[str(step)] = entry
        rp.write_json(path, done)


def main(argv: list[str] | None = None) -> None:
    args, report = parse(argv)
    if report is not None:
        for folder in report:
            print(markdown(Path(folder)))
        return
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    data = None if args.smoke else rp.find_data(args.data)
    device, dtype = torch.device("cpu"), torch.float32
    if args.smoke:
        train_recs, val, tests = smoke_records()
        judge, confirm = val, train_recs[:4]  # the smoke run's model saw nothing real
        if args.judge_strata:  # two strata of two records each, of unequal lengths
            judge, confirm = ({"short": x[:2], "long": x[2:]} for x in (judge, confirm))
    else:
        raw, kept, counts = rp.load_training(args.task, data)
        train_recs, val = rp.split_training(kept, args, counts)
        tests, test_counts = rp.load_tests(args, data, raw)
        judge, confirm = judge_records(kept, args, train_recs, val, counts)
        if args.judge_strata:
            judge, confirm, counts["strata"] = judge_strata.stratified_records(
                unseen_pool(kept, args, train_recs), tests, raw, data, args)
        rp.write_json(out / "records.json", {"training": counts, "tests": test_counts})
    model, tok = rp.load_model(args, device, dtype)
    pruning = rp.prune(model, tok, args, data, train_recs, out)
    print(f"[prune] sparsity {pruning['sparsity']:.2%}", flush=True)
    train_ds = instruction_dataset(train_recs, tok, cutoff_len=args.cutoff)
    rows, val_rows = loss_rows(args, tests, val, tok)
    if "base" in args.phases and not (out / "curve-base.json").is_file():
        entry = losses(model, rows, val_rows, args.eval_batch)  # the pruned model, no adapter
        rp.write_json(out / "curve-base.json", {"0": {"pruned": {**entry, "params": 0}}})
        print(f"[curve] pruned base: val {entry['val']:.4f} test {entry['test_mean']:.4f}",
              flush=True)
    args.test_records = tests
    judge_rows, args.confirm_rows = (search_phases.rows_of(x, tok, args.cutoff)
                                     for x in (judge, confirm))
    for kind, ranks in (("lora", (args.ranks[0],)), ("nls", args.ranks)):
        if kind not in args.adapters:
            continue
        searching = kind == "nls" and set(args.phases) & set(search_phases.PHASES)
        if not ({"train", "curve"} & set(args.phases) or searching):
            continue
        if "train" in args.phases:
            train(model, tok, ranks, train_ds, args, out / kind)
        elif "curve" in args.phases or searching:
            torch.manual_seed(args.seed)
            shears.add_elastic_lora(model, args.targets, ranks=ranks, alpha=args.alpha,
                                    dropout=args.dropout, groups="qkv")
        if "curve" in args.phases:
            curve(model, kind, args, rows, val_rows, out)
        if searching:
            search_phases.run(model, tok, args, rows, judge_rows, out)
        rp.strip_adapters(model)


def judge_records(kept: list[dict], args, train: list[dict], val: list[dict],
                  counts: dict) -> tuple[list[dict], list[dict]]:
    """The search's judge and the confirmation records.

    The judge is the validation slice, extended to ``args.judge_records`` by pool records
    that come after the training ones (in split_training's seeded order) and share no
    problem with them: a larger judge that leaves the training records as they were, so a
    trained super-adapter can be searched on it. The next ``args.confirm_records`` such
    records (none of them in the judge) are the confirmation set of ``confirm``."""
    unseen = unseen_pool(kept, args, train)
    n_extra = max(0, args.judge_records - len(val))
    extra, unseen = unseen[:n_extra], rp.drop_overlap(unseen[n_extra:], val + unseen[:n_extra])
    confirm = unseen[: args.confirm_records]
    if len(extra) < n_extra or len(confirm) < args.confirm_records:
        raise SystemExit(f"--judge-records {args.judge_records} and --confirm-records "
                         f"{args.confirm_records}: only {len(val) + len(extra) + len(confirm)}"
                         " unseen records")
    counts.update(judge=len(val) + len(extra), confirmation=len(confirm))
    return val + extra, confirm


def unseen_pool(kept: list[dict], args, train: list[dict]) -> list[dict]:
    """Pool records after the training ones (split_training's seeded order) that share no
    problem with them."""
    return rp.drop_overlap(rp.validation_and_pool(kept, args)[1][len(train):], train)


def smoke_records():
    recs = [{"instruction": f"What is {i} + {i}?", "input": "", "output": f"{2 * i}",
             "answer": str(2 * i), "task": "gsm8k"} for i in range(40)]
    return recs[:32], recs[32:36], {"gsm8k": recs[36:]}


def markdown(out: Path) -> str:
    lines = [f"### {out.name}", "", "| adapter | step | params | val loss | held-out loss |",
             "|---|---|---|---|---|"]
    for kind in ("base", "lora", "nls"):
        done = rp.read_json(out / f"curve-{kind}.json", {})
        for step, entry in sorted(done.items(), key=lambda kv: int(kv[0])):
            for name, e in entry.items():
                label = {"lora": "LoRA r=32", "base": "no adapter"}.get(kind, f"NLS {name}")
                lines.append(f"| {label} | {step} | {e['params']:,} | {e['val']:.4f} | "
                             f"{e['test_mean']:.4f} |")
    searched = [f for f in sorted(out.glob("search*")) if f.is_dir()]
    return "\n".join(lines) + "\n\n" + "\n".join(
        f"#### {f.name}\n\n{search_phases.markdown(f)}" for f in searched)


if __name__ == "__main__":
    main()
