"""The Shears comparison (paper, Tables 4 and 6) on any causal LM, in one script.

    python examples/reproduce.py --task math --data ../shared/data            # paper settings
    python examples/reproduce.py --smoke                                       # tiny, seconds

Rows, all trained on the same records with the same steps, optimizer, schedule and seed:

    dense (untuned) | Wanda-pruned (untuned) | pruned + LoRA r=32 |
    pruned + NLS super-adapter [32, 24, 16] read out as maximal, heuristic, minimal,
    hill-climb, NLS front search (no larger than the heuristic) and members of the
    R-NSGA-II front

Columns: held-out loss and accuracy per test set (95% Wilson interval), their averages,
the sub-adapter's adapter parameters, the base model's sparsity, the validation loss that
judged the search. The paper (LLaMA-7B, 50% sparsity, math) reports LoRA 43.3 against
NLS-heuristic 45.3, and minimal 43.5 < maximal 44.5 < heuristic 45.3 < R-NSGA-II 45.7 <
hill-climb 45.9; the script writes those comparisons out with an exact McNemar test.

Data: --task math trains on math_data.json, keeping only records whose rationale ends in
the gold answer, and evaluates on the math test sets minus every problem math_data.json
contains; --task commonsense trains on the union of the commonsense train sets and
evaluates on the commonsense test sets. The search is judged on the validation loss of a
slice held out of the training records, never on a test set.

Writes to --out: results.json (everything: arguments, versions, seeds, record counts, wall
and process CPU time per phase, every row), results.md (the tables), search.png, and the
pieces a rerun reuses: the same command on the same --out skips every finished evaluation,
trained adapter and search evaluation.

On 2 CPU cores, docs/results.md's budget takes about 70 minutes per task (SmolLM2-135M):

    python examples/reproduce.py --task math --data ../shared/data --out outputs/math \
      --records 640 --epochs 1 --val-records 32 --eval-records 20 --max-new-tokens 128 \
      --budget 16 --population 8 --front-eval 2 --nsamples 32 --calib-seqlen 256 --threads 1 \
      --num-beams 1 --answer-rule shears --nls-sample-every step --lr-scheduler linear
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import transformers
from quickstart import TARGETS
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

import shears
from shears.adapters import ElasticLoRALinear
from shears.evaluation import (
    InstructionCollator,
    drop_overlap,
    evaluate_generation,
    evaluate_loss,
    extract_answer,
    format_prompt,
    instruction_dataset,
    is_correct,
    load_task,
    mcnemar_exact,
    tokenize_record,
    wilson_interval,
)
from shears.evaluation.answers import RULES as ANSWER_RULES

REPO = Path(__file__).resolve().parents[1]
MATH_TESTS = ["gsm8k", "AQuA", "mawps", "AddSub", "MultiArith", "SingleEq"]
COMMONSENSE_TRAIN = ["boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"]
COMMONSENSE_TESTS = ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge",
                     "openbookqa"]
# The paper's average math accuracy (LLaMA-7B, 50% Wanda sparsity), Tables 4 and 6.
PAPER = {"LoRA": 43.3, "NLS minimal": 43.5, "NLS maximal": 44.5, "NLS heuristic": 45.3,
         "NLS R-NSGA-II": 45.7, "NLS hill-climb": 45.9}
# Each claim: the second row should beat the first.
CLAIMS = [("LoRA", "NLS heuristic"), ("NLS minimal", "NLS maximal"),
          ("NLS maximal", "NLS heuristic"), ("NLS heuristic", "NLS R-NSGA-II"),
          ("NLS R-NSGA-II", "NLS hill-climb")]
# --smoke: a tiny random model and a handful of everything (explicit flags still win).
SMOKE = dict(calibration="train", nsamples=4, calib_seqlen=64, records=16, val_records=4,
             batch_size=4, micro_batch=2, steps=2, warmup_steps=0, cutoff=512, budget=5,
             population=3, front_eval=2, eval_records=3, max_new_tokens=4, eval_batch=4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=["math", "commonsense"], default="math")
    p.add_argument("--model", default=None, help="local HF checkpoint (default: SmolLM2-135M-"
                   "Instruct through examples/smollm2.py)")
    p.add_argument("--data", default=None, help="folder holding llm-adapters/ (and wikitext-2-raw/"
                   "); default $SHEARS_DATA_DIR, else ../shared/data beside the repository")
    p.add_argument("--out", default=None, help="output folder, default outputs/reproduce-<task>; "
                   "the same command on the same folder resumes")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, a few records/steps")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if any)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bfloat16 on a GPU that has it, else float32")
    p.add_argument("--seed", type=int, default=0, help="every seed of the run")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's "
                   "default); 1 can be faster on cores shared with other jobs")
    g = p.add_argument_group("pruning (Wanda)")
    g.add_argument("--sparsity", type=float, default=0.5)
    g.add_argument("--pattern", default="unstructured", help='"unstructured" or N:M, e.g. "2:4"')
    g.add_argument("--allocation", choices=["uniform", "owl"], default="uniform",
                   help="uniform: every map at --sparsity; owl: a sparsity per block from its "
                   "outlier scores, mean over pruned parameters --sparsity (docs/pruning.md)")
    g.add_argument("--owl-threshold", type=float, default=5.0, help="OWL's M")
    g.add_argument("--owl-lambda", type=float, default=0.08, help="OWL's lambda")
    g.add_argument("--owl-rows", type=int, default=None,
                   help="calibration rows of OWL's dense pass (default: an eighth)")
    g.add_argument("--calibration", choices=["wikitext2", "train"], default="wikitext2",
                   help="calibration text: WikiText-2 test, or the training records")
    g.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    g.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per window")
    g = p.add_argument_group("adapters and training (defaults: the paper's)")
    g.add_argument("--targets", default=",".join(TARGETS), help="module name suffixes")
    g.add_argument("--ranks", default="32,24,16", help="NLS ranks; LoRA uses the largest")
    g.add_argument("--alpha", type=float, default=64.0)
    g.add_argument("--dropout", type=float, default=0.1, help="adapter dropout (authors' 0.1)")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--batch-size", type=int, default=16, help="records per optimizer step")
    g.add_argument("--micro-batch", type=int, default=4, help="records per forward pass")
    g.add_argument("--cutoff", type=int, default=256, help="tokens per record")
    g.add_argument("--epochs", type=float, default=3.0)
    g.add_argument("--steps", type=int, default=0, help="optimizer steps (0: use --epochs)")
    g.add_argument("--lr-scheduler", choices=["cosine", "linear"], default="cosine",
                   help="cosine: the authors' (NNCF's cosine to 0, no warm-up; docs/fidelity.md); "
                        "linear: HF's linear decay after --warmup-steps")
    g.add_argument("--warmup-steps", type=int, default=100,
                   help="linear only (the authors' command passes 100, which their patched "
                        "Trainer ignores); capped at 10%% of the steps")
    g.add_argument("--records", type=int, default=0, help="training records (0: all)")
    g.add_argument("--val-records", type=int, default=128, help="validation slice for the search")
    g.add_argument("--nls-sample-every", choices=["step", "micro_batch"], default="micro_batch",
                   help="NLS draws a sub-adapter per micro-batch (the authors') or per "
                   "optimizer step")
    g = p.add_argument_group("search")
    g.add_argument("--budget", type=int, default=50, help="evaluations per search")
    g.add_argument("--population", type=int, default=10, help="R-NSGA-II population")
    g.add_argument("--front-eval", type=int, default=3,
                   help="R-NSGA-II front members evaluated on the test sets")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-records", type=int, default=0, help="records per test set (0: all)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="math 256, commonsense 32")
    g.add_argument("--eval-batch", type=int, default=16)
    g.add_argument("--num-beams", type=int, default=4, help="4: LLM-Adapters' beam search "
                   "(the paper's); 1: greedy, cheaper")
    g.add_argument("--answer-rule", choices=list(ANSWER_RULES), default="llm-adapters",
                   help="answer extraction of the test sets: llm-adapters (the reference's, "
                   "comparable with the paper) or shears (docs/evaluation.md)")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**SMOKE)
    args = p.parse_args(argv)
    args.ranks = tuple(sorted((int(r) for r in args.ranks.split(",")), reverse=True))
    args.targets = args.targets.split(",")
    if args.max_new_tokens is None:
        args.max_new_tokens = 256 if args.task == "math" else 32
    if args.num_beams < 1:
        p.error(f"--num-beams {args.num_beams} is not a positive number of beams")
    if args.batch_size % args.micro_batch:
        p.error(f"--batch-size {args.batch_size} is not a multiple of --micro-batch")
    return args


# ---- bookkeeping: JSON files, clocks, phases --------------------------------------------------

def read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.is_file() else default


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)  # atomic: a run killed mid-write never leaves half a file behind


class Ledger:
    """Wall and process CPU time per phase, accumulated in ``phases.json`` over the runs
    that worked on it (a rerun that finds a phase cached adds almost nothing)."""

    def __init__(self, out: Path) -> None:
        self.path = out / "phases.json"
        self.phases = read_json(self.path, {})

    @contextmanager
    def phase(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        entry = self.phases.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "runs": 0})
        entry["wall_s"] += time.perf_counter() - wall
        entry["cpu_s"] += time.process_time() - cpu  # all threads of this process
        entry["runs"] += 1
        write_json(self.path, self.phases)


# What a folder written before a flag existed ran with (docs/results.md's measured runs).
SETTINGS_BEFORE_FLAGS = {"num_beams": 1, "answer_rule": "shears", "nls_sample_every": "step",
                         "lr_scheduler": "linear", "allocation": "uniform",
                         "owl_threshold": 5.0, "owl_lambda": 0.08, "owl_rows": None}


def check_settings(out: Path, args: argparse.Namespace) -> None:
    """Refuse to resume from a folder whose finished pieces came from other settings."""
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "device", "threads")}
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back
    old = read_json(out / "settings.json")
    if old is not None:
        old = {**SETTINGS_BEFORE_FLAGS, **old}
    if old is not None and old != settings:
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        sys.exit(f"{out} holds results of other settings ({', '.join(changed)}): "
                 "pass another --out or delete that folder")
    write_json(out / "settings.json", settings)


# ---- data --------------------------------------------------------------------------------------

def find_data(path: str | None) -> Path:
    """--data, else $SHEARS_DATA_DIR, else ../shared/data beside the repository."""
    for candidate in (path, os.environ.get("SHEARS_DATA_DIR"), REPO.parent / "shared" / "data"):
        if candidate:
            if not Path(candidate).exists():
                sys.exit(f"data folder {candidate} does not exist")
            return Path(candidate)
    sys.exit("no data: pass --data (the folder holding llm-adapters/) or set SHEARS_DATA_DIR")


def adapters_folder(data: Path) -> Path:
    return data / "llm-adapters" if (data / "llm-adapters").is_dir() else data


def rationale_is_right(record: dict, task: str) -> bool:
    """Whether the record's own response ends in its gold answer (answer extraction of
    ``task``); LLM-Adapters' generated rationales are wrong about a quarter of the time."""
    return is_correct(extract_answer(record.get("output") or "", task), record["answer"], task)


def load_training(task: str, data: Path) -> tuple[list[dict], list[dict], dict]:
    """(all training records, those with a right rationale, counts). Records gain a
    ``task`` key: the answer extraction that judges them."""
    if task == "math":
        raw = json.loads((adapters_folder(data) / "math_data.json").read_text())
        letter = re.compile(r"[A-E]")  # AQuA-style records answer with a letter
        raw = [dict(r, task="AQuA" if letter.fullmatch(r["answer"].strip()) else "gsm8k")
               for r in raw]
        files = ["math_data.json"]
    else:
        folder = adapters_folder(data)
        files = [n for n in COMMONSENSE_TRAIN if (folder / f"{n}_train.json").exists()]
        if not files:
            sys.exit(f"no commonsense training set ({COMMONSENSE_TRAIN}) in {folder}")
        raw = [dict(r, task=n) for n in files for r in load_task(n, data, split="train")]
    kept = [r for r in raw if rationale_is_right(r, r["task"])]
    counts = {"files": files, "records": len(raw), "dropped_wrong_answer": len(raw) - len(kept)}
    return raw, kept, counts


def split_training(records: list[dict], args: argparse.Namespace, counts: dict):
    """A seeded validation slice for the search, and the training records: the rest, minus
    problems that also occur in the slice, subsampled to --records."""
    val, pool = validation_and_pool(records, args)
    train = pool[: args.records or None]  # already in random order
    counts.update(validation=len(val), dropped_overlap_with_validation=len(records)
                  - len(val) - len(pool), pool=len(pool), train=len(train))
    return train, val


def validation_and_pool(records: list[dict], args: argparse.Namespace):
    """The seeded validation slice, and the other records in that seeded order minus
    problems that occur in the slice (the pool the training records are drawn from)."""
    order = np.random.default_rng(args.seed).permutation(len(records))
    val = [records[i] for i in order[: args.val_records]]
    return val, drop_overlap([records[i] for i in order[args.val_records:]], val)


def subsample(records: list[dict], n: int, seed: int) -> list[dict]:
    if not n or n >= len(records):
        return records
    keep = np.random.default_rng(seed).choice(len(records), n, replace=False)
    return [records[i] for i in sorted(keep)]


def load_tests(args: argparse.Namespace, data: Path, training: list[dict]):
    """Test sets minus every problem of the training files, subsampled to --eval-records."""
    tests, counts = {}, {}
    for name in MATH_TESTS if args.task == "math" else COMMONSENSE_TESTS:
        try:
            records = load_task(name, data)
        except FileNotFoundError:
            counts[name] = {"missing": True}
            continue
        held_out = drop_overlap(records, training)
        tests[name] = subsample(held_out, args.eval_records, args.seed)
        counts[name] = {"records": len(records), "in_training": len(records) - len(held_out),
                        "held_out": len(held_out), "evaluated": len(tests[name])}
    if not tests:
        sys.exit(f"no test set of task {args.task} found in {adapters_folder(data)}")
    return tests, counts


def response_rows(records: list[dict], tok, cutoff: int) -> list[dict] | None:
    """Rows whose loss counts only response tokens (prompt masked); records whose response
    lies wholly beyond the cut-off are left out. ``None`` when nothing is left."""
    rows = [tokenize_record(r, tok, cutoff, train_on_inputs=False) for r in records]
    rows = [r for r in rows if any(label != -100 for label in r["labels"])]
    return rows or None


# ---- model ----------------------------------------------------------------------------------

def pick_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    name = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {name}, but torch sees no GPU")
    if args.dtype != "auto":
        return device, getattr(torch, args.dtype)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return device, torch.bfloat16 if bf16 else torch.float32


def byte_tokenizer():
    """A byte-level tokenizer built in memory (no hub, no file): 256 bytes and ``</s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def load_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    if args.smoke:  # a tiny random Llama: 2 blocks of width 64
        tok = byte_tokenizer()
        config = transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(args.seed)
        model = transformers.LlamaForCausalLM(config).to(dtype)
    elif args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(args.model)
    else:
        from smollm2 import load_smollm2

        model, tok = load_smollm2(dtype=dtype)
    return model.to(device).eval(), tok


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every weight: a resumed run checks that pruning gave the same model."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def prune(model, tok, args, data: Path, train: list[dict], out: Path) -> dict:
    """Wanda in place; the report (and a digest of the pruned weights) goes to pruning.json."""
    if args.calibration == "wikitext2":
        texts = [(data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")]
    else:
        texts = [format_prompt(r["instruction"], r.get("input"), r["output"]) for r in train]
    calibration = shears.calibration_data(tok, texts, args.nsamples, args.calib_seqlen, args.seed)
    sparsity = None if args.pattern != "unstructured" else args.sparsity
    report = shears.wanda_prune(model, calibration, sparsity, pattern=args.pattern,
                                allocation=args.allocation, owl_threshold=args.owl_threshold,
                                owl_lambda=args.owl_lambda,
                                owl_rows="auto" if args.owl_rows is None else args.owl_rows)
    summary = {k: v for k, v in report.to_dict().items() if k != "modules"}
    summary.update(maps=len(report.modules), digest=weights_digest(model))
    cached = read_json(out / "pruning.json")
    if cached is not None and cached["digest"] != summary["digest"]:
        sys.exit(f"pruning gave other weights than the run that wrote {out}: its trained "
                 "adapters do not fit; delete the folder or pass another --out")
    write_json(out / "pruning.json", summary)
    return summary


def strip_adapters(model: torch.nn.Module) -> None:
    """Put every adapted layer's original back; its weights were frozen, hence untouched."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ElasticLoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.base_layer)


def train_adapter(model, tok, ranks: tuple[int, ...], train_ds, args, device, dtype,
                  folder: Path) -> dict:
    """Attach elastic LoRA with ``ranks`` and train it with NLSTrainer (one rank: plain
    LoRA), or load it from ``folder`` when a previous run finished it. Returns the log."""
    torch.manual_seed(args.seed)  # LoRA and NLS start from the same A (same shape at r_max)
    shears.add_elastic_lora(model, args.targets, ranks=ranks, alpha=args.alpha,
                            dropout=args.dropout, groups="qkv")
    if (folder / "train_log.json").is_file():  # written last: the adapter is complete
        shears.load_adapter(model, folder)
        return read_json(folder / "train_log.json")
    steps_per_epoch = math.ceil(len(train_ds) / args.batch_size)
    total = args.steps or math.ceil(steps_per_epoch * args.epochs)
    training_args = TrainingArguments(
        output_dir=str(folder / "trainer"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.batch_size // args.micro_batch,
        learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.steps or -1,
        # The authors' patched Trainer ran NNCF's cosine schedule with no warm-up (their
        # --warmup_steps was ignored): docs/training.md, "The authors' learning-rate schedule".
        warmup_steps=0 if args.lr_scheduler == "cosine" else min(args.warmup_steps, total // 10),
        lr_scheduler_type=args.lr_scheduler,
        optim="adamw_torch", weight_decay=0.0, logging_steps=max(1, total // 20),
        save_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed,
        use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16,
    )
    trainer = shears.NLSTrainer(model=model, args=training_args, train_dataset=train_ds,
                                data_collator=InstructionCollator(tok), nls_seed=args.seed,
                                nls_sample_every=args.nls_sample_every)
    trainer.train()
    model.eval()
    log = {"ranks": list(ranks), "nls_sample_every": args.nls_sample_every,
           "optimizer_steps": trainer.state.global_step,
           "records_seen": trainer.state.global_step * args.batch_size,
           "log_history": trainer.state.log_history,
           "rank_counts": trainer.nls_history.rank_counts() if len(ranks) > 1 else None}
    shears.save_adapter(model, folder)
    write_json(folder / "train_log.json", log)
    return log


# ---- evaluation: one row of the table ---------------------------------------------------------

class Bench:
    """The test sets, validation slice and caches every row is judged with."""

    def __init__(self, tok, tests, args, out: Path, ledger: Ledger, val: list[dict]) -> None:
        self.tok, self.tests, self.args, self.out, self.ledger = tok, tests, args, out, ledger
        # Loss on the tests: reference responses whose own answer is right (as in training)
        self.loss_rows = {n: response_rows([r for r in recs if rationale_is_right(r, n)], tok,
                                           args.cutoff) for n, recs in tests.items()}
        self.val = response_rows(val, tok, args.cutoff)
        if self.val is None:
            sys.exit("the validation slice has no response token within --cutoff")
        self.val_memo_path = out / "val_loss.jsonl"
        self.val_memo = {}
        if self.val_memo_path.is_file():
            for line in self.val_memo_path.read_text().splitlines():
                entry = json.loads(line)
                self.val_memo[entry["key"]] = entry["loss"]

    def val_loss(self, model, key: str | None = None) -> float:
        """Validation loss of the model as it stands, remembered across runs under ``key``
        (default: the active sub-adapter of the NLS super-adapter)."""
        key = key or "nls " + config_key(shears.get_config(model))
        if key not in self.val_memo:
            self.val_memo[key] = evaluate_loss(model, self.val, batch_size=self.args.eval_batch)
            with open(self.val_memo_path, "a") as f:
                f.write(json.dumps({"key": key, "loss": self.val_memo[key]}) + "\n")
        return self.val_memo[key]

    def judge(self, model):
        """``evaluate(config) -> validation loss`` for the searches; each sub-adapter is
        evaluated once, whichever search (or run) asks first."""
        return shears.make_evaluator(model, self.val_loss)

    def row(self, model, name: str, key: str, sparsity: float, params: int = 0,
            config: dict | None = None) -> dict:
        """Accuracy and loss of the active model on every test set (cached per set)."""
        tests = {}
        with self.ledger.phase(f"evaluate: {key}"):
            val = self.val_loss(model, key if config is None else None)
            for task, records in tqdm(self.tests.items(), desc=f"test sets, {name}"):
                tests[task] = self._test_set(model, key, task, records)
        return summarise(name, key, tests, val, params, sparsity, config)

    def _test_set(self, model, key: str, task: str, records: list[dict]) -> dict:
        path = self.out / "evals" / key / f"{task}.json"
        cached = read_json(path)
        if cached is None:
            result = evaluate_generation(model, self.tok, records, task,
                                         batch_size=self.args.eval_batch,
                                         max_new_tokens=self.args.max_new_tokens,
                                         num_beams=self.args.num_beams,
                                         rule=self.args.answer_rule)
            rows = self.loss_rows[task]
            loss = None if rows is None else evaluate_loss(model, rows, self.args.eval_batch)
            cached = {"task": task, "n": len(records), "correct": result.n_correct,
                      "loss": loss, "loss_records": len(rows or []), "records": result.records}
            write_json(path, cached)
        return {"n": cached["n"], "correct": cached["correct"], "loss": cached["loss"],
                "loss_records": cached["loss_records"],
                "flags": [bool(r["correct"]) for r in cached["records"]]}


def config_key(config: dict[str, int]) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def summarise(name, key, tests, val_loss, params, sparsity, config) -> dict:
    """A row: per test set accuracy with its Wilson interval and loss, and the averages
    (macro means as the paper; the interval of the average is Wilson's on pooled counts)."""
    for t in tests.values():
        t["accuracy"] = t["correct"] / t["n"] if t["n"] else 0.0
        t["interval"] = list(wilson_interval(t["correct"], t["n"]))
    n, correct = sum(t["n"] for t in tests.values()), sum(t["correct"] for t in tests.values())
    losses = [t["loss"] for t in tests.values() if t["loss"] is not None]
    return {"row": name, "key": key, "config": config, "adapter_parameters": params,
            "sparsity": sparsity, "val_loss": val_loss, "tests": tests,
            "average": {"accuracy": float(np.mean([t["accuracy"] for t in tests.values()])),
                        "pooled_n": n, "pooled_correct": correct,
                        "interval": list(wilson_interval(correct, n)),
                        "loss": float(np.mean(losses)) if losses else None}}


# ---- search -----------------------------------------------------------------------------------

def run_searches(model, bench: Bench, args, ledger: Ledger, out: Path, named: dict):
    """Hill-climb and R-NSGA-II over the super-adapter, judged on validation loss."""
    evaluate = bench.judge(model)
    with ledger.phase("search: hill-climb"):
        hc = shears.hill_climb(model, evaluate, budget=args.budget, seed=args.seed,
                               maximize=False)
    hc.save(out / "hill_climb.json")
    # Aim R-NSGA-II at the heuristic's size with the best loss of the named sub-adapters.
    best_named = min(evaluate(c) for c in named.values())
    reference = [(best_named, shears.adapter_parameters(model, named["heuristic"]))]
    generations = max(1, math.ceil(args.budget / args.population) - 1)
    with ledger.phase("search: R-NSGA-II"):
        ns = shears.nsga2_search(model, evaluate, population=args.population,
                                 generations=generations, budget=args.budget, seed=args.seed,
                                 reference_points=reference, maximize=False)
    ns.save(out / "rnsga2.json")
    return hc, ns


def run_front_search(model, bench: Bench, args, ledger: Ledger, out: Path, named: dict):
    """front_search within the heuristic's adapter parameters, judged on the validation
    slice in 8 chunks (its race), from the rank sensitivity on the same records. Both are
    saved; a rerun loads them instead of searching again."""
    path, sens_path = out / "front_search.json", out / "sensitivity.json"
    if path.is_file():
        return shears.SearchResult.load(path)
    rows = bench.val
    size = max(1, math.ceil(len(rows) / 8))
    collate = InstructionCollator(bench.tok)
    batches = [collate(rows[i: i + size]) for i in range(0, len(rows), size)]
    judge = shears.make_chunked_evaluator(model, batches)
    with ledger.phase("search: sensitivity"):
        if sens_path.is_file():
            sens = shears.RankSensitivity.load(sens_path)
        else:
            sens = shears.rank_sensitivity(model, batches)
            sens.save(sens_path)
    limit = shears.adapter_parameters(model, named["heuristic"])
    with ledger.phase("search: front search"):
        result = shears.front_search(model, judge, budget=args.budget, max_params=limit,
                                     sensitivity=sens, seed=args.seed)
    result.save(path)
    return result


def front_members(result, k: int) -> list:
    """The best (lowest validation loss) member of the front, then members spread evenly
    along it by adapter parameters, up to ``k`` in all."""
    front = result.pareto_front  # sorted by parameters
    picks = [result.best]
    for i in np.linspace(0, len(front) - 1, k).round().astype(int):
        if len(picks) < k and all(front[i].config != p.config for p in picks):
            picks.append(front[i])
    return picks


def plot_searches(hc, ns, fs, path: Path) -> None:
    """The three searches' plot_search figures side by side in one PNG."""
    from matplotlib.image import imsave

    panels = []
    for result, title in ((hc, "hill-climb"), (fs, "front search"), (ns, "R-NSGA-II")):
        fig = shears.plot_search(result, title=f"{title}: {len(result.history)} sub-adapters, "
                                 f"best validation loss {result.best_score:.4f}")
        fig.canvas.draw()
        panels.append(np.asarray(fig.canvas.buffer_rgba()))
    height = min(p.shape[0] for p in panels)
    imsave(path, np.concatenate([p[:height] for p in panels], axis=1))


# ---- outputs ----------------------------------------------------------------------------------

def compare(rows: dict[str, dict], first: str, second: str) -> dict | None:
    """The paper's claim "second beats first", measured: accuracy difference in points,
    discordant problems and the exact McNemar p-value, loss differences."""
    if first not in rows or second not in rows:
        return None
    a, b = rows[first], rows[second]
    fa = [f for t in a["tests"].values() for f in t["flags"]]
    fb = [f for t in b["tests"].values() for f in t["flags"]]
    only_a = sum(x and not y for x, y in zip(fa, fb, strict=True))
    only_b = sum(y and not x for x, y in zip(fa, fb, strict=True))
    la, lb = a["average"]["loss"], b["average"]["loss"]
    return {"first": first, "second": second,
            "paper": [PAPER[first], PAPER[second]],
            "accuracy": [a["average"]["accuracy"], b["average"]["accuracy"]],
            "delta_points": 100 * (b["average"]["accuracy"] - a["average"]["accuracy"]),
            "only_first": only_a, "only_second": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b),
            "delta_test_loss": None if la is None or lb is None else lb - la,
            "delta_val_loss": b["val_loss"] - a["val_loss"]}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(rows: list[dict], comparisons: list[dict], tasks: list[str]) -> str:
    head = ["row", "adapter params", "sparsity", "val loss"]
    acc = ["| " + " | ".join(head + tasks + ["average [pooled 95%]"]) + " |",
           "|" + "---|" * (len(head) + len(tasks) + 1)]
    loss = ["| " + " | ".join(["row"] + tasks + ["average"]) + " |",
            "|" + "---|" * (len(tasks) + 2)]
    for r in rows:
        cells = [r["row"], f"{r['adapter_parameters']:,}", f"{r['sparsity']:.1%}",
                 f"{r['val_loss']:.4f}"]
        for t in tasks:
            x = r["tests"][t]
            cells.append(f"{pct(x['accuracy'])} [{pct(x['interval'][0])}, {pct(x['interval'][1])}]")
        avg = r["average"]
        cells.append(f"**{pct(avg['accuracy'])}** [{pct(avg['interval'][0])}, "
                     f"{pct(avg['interval'][1])}]")
        acc.append("| " + " | ".join(cells) + " |")
        losses = [r["tests"][t]["loss"] for t in tasks] + [avg["loss"]]
        loss.append("| " + " | ".join([r["row"]] + ["n/a" if v is None else f"{v:.4f}"
                                                     for v in losses]) + " |")
    claims = ["| claim (second beats first) | paper | measured avg. accuracy | Δ points | "
              "only first / only second right | McNemar p | Δ test loss | Δ val loss |",
              "|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        dtl = "n/a" if c["delta_test_loss"] is None else f"{c['delta_test_loss']:+.4f}"
        claims.append(
            f"| {c['first']} < {c['second']} | {c['paper'][0]} → {c['paper'][1]} | "
            f"{pct(c['accuracy'][0])} → {pct(c['accuracy'][1])} | {c['delta_points']:+.1f} | "
            f"{c['only_first']} / {c['only_second']} | {c['mcnemar_p']:.3f} | {dtl} | "
            f"{c['delta_val_loss']:+.4f} |")
    return "\n".join(["Accuracy (%) with 95% Wilson intervals; the average is the mean over "
                      "test sets, its interval Wilson's on the pooled counts.", "", *acc, "",
                      "Held-out loss (response tokens, reference responses whose answer is "
                      "right; n/a: the set has none).", "", *loss, "",
                      "The paper's claims (LLaMA-7B, 50% sparsity, math).", "", *claims, ""])


def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def versions() -> dict:
    """Library versions and the repository's commit (``dirty``: tracked files changed)."""
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "shears": shears.__version__,
            "shears_commit": git("rev-parse", "HEAD"),
            "shears_dirty": None if status is None else bool(status),
            "numpy": np.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


# ---- the run ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    suffix = "-smoke" if args.smoke else ""
    out = Path(args.out or REPO / "outputs" / f"reproduce-{args.task}{suffix}")
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    environment = versions()  # at the start: the code that runs, not what HEAD is at the end
    ledger = Ledger(out)
    device, dtype = pick_device(args)
    data = find_data(args.data)

    # 1. Data: training records (right rationales only), validation slice, held-out tests
    with ledger.phase("data"):
        raw, kept, train_counts = load_training(args.task, data)
        train, val = split_training(kept, args, train_counts)
        tests, test_counts = load_tests(args, data, raw)
    print(f"[data] {', '.join(train_counts['files'])}: {train_counts['records']} records, "
          f"{train_counts['dropped_wrong_answer']} dropped (rationale's answer is not the gold "
          f"one), {train_counts['validation']} for validation, {train_counts['train']} of the "
          f"remaining {train_counts['pool']} for training; test sets: "
          + ", ".join(f"{n} {c['evaluated']}/{c['held_out']} held out" for n, c in
                      test_counts.items() if not c.get("missing")))

    # 2. Dense, then Wanda-pruned, both untuned
    with ledger.phase("load model"):
        model, tok = load_model(args, device, dtype)
    bench = Bench(tok, tests, args, out, ledger, val)
    rows = [bench.row(model, "dense", "dense", shears.sparsity_report(model).sparsity)]
    with ledger.phase("prune"):
        pruning = prune(model, tok, args, data, train, out)
    print(f"[prune] {args.pattern} Wanda: sparsity {pruning['sparsity']:.2%} of "
          f"{pruning['maps']} maps")
    rows.append(bench.row(model, "Wanda-pruned", "pruned", pruning["sparsity"]))
    train_ds = instruction_dataset(train, tok, cutoff_len=args.cutoff)

    # 3. Pruned + plain LoRA: one rank, r_max, under the same NLSTrainer
    lora = (args.ranks[0],)
    with ledger.phase("train: LoRA"):
        lora_log = train_adapter(model, tok, lora, train_ds, args, device, dtype, out / "lora")
    rows.append(bench.row(model, "LoRA", "lora", pruning["sparsity"],
                          shears.adapter_parameters(model)))
    strip_adapters(model)

    # 4. Pruned + NLS super-adapter, read out as named sub-adapters and searched ones
    with ledger.phase("train: NLS"):
        nls_log = train_adapter(model, tok, args.ranks, train_ds, args, device, dtype,
                                out / "nls")
    named = {n: getattr(shears, f"{n}_config")(model) for n in ("maximal", "heuristic", "minimal")}
    hc, ns = run_searches(model, bench, args, ledger, out, named)
    fs = run_front_search(model, bench, args, ledger, out, named)
    readouts = [(f"NLS {n}", c) for n, c in named.items()]
    readouts.append(("NLS hill-climb", hc.best_config))
    readouts.append(("NLS front search", fs.best_config))
    front = front_members(ns, args.front_eval)
    readouts.append(("NLS R-NSGA-II", front[0].config))
    readouts += [(f"NLS R-NSGA-II front ({e.params / 1e6:.2f}M)", e.config) for e in front[1:]]
    for name, config in readouts:
        shears.set_config(model, config)
        rows.append(bench.row(model, name, "nls-" + config_key(config), pruning["sparsity"],
                              shears.adapter_parameters(model), config))
    plot_searches(hc, ns, fs, out / "search.png")

    # 5. Tables and everything else
    by_name = {r["row"]: r for r in rows}
    comparisons = [c for c in (compare(by_name, a, b) for a, b in CLAIMS) if c]
    decoding = "greedy" if args.num_beams == 1 else f"{args.num_beams}-beam search"
    table = (f"Generation: {decoding}, up to {args.max_new_tokens} new tokens; answers "
             f"extracted by the {args.answer_rule} rule.\n\n"
             + markdown(rows, comparisons, list(tests)))
    (out / "results.md").write_text(table)
    results = {
        "args": {k: v for k, v in vars(args).items()}, "device": str(device), "dtype": str(dtype),
        "versions": environment,
        "evaluation": {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens,
                       "answer_rule": args.answer_rule},
        "seeds": {"data split and subsamples": args.seed, "calibration windows": args.seed,
                  "adapter initialisation": args.seed, "Trainer (order, dropout)": args.seed,
                  "NLS sampler": args.seed, "searches": args.seed},
        "records": {"training": train_counts, "tests": test_counts},
        "pruning": pruning, "training": {"LoRA": lora_log, "NLS": nls_log},
        "search": {"front_search": {"evaluations": len(fs.history), "best": fs.best_config,
                                    "best_val_loss": fs.best_score,
                                    "spent": fs.settings["spent"],
                                    "max_params": fs.settings["max_params"],
                                    "file": "front_search.json"},
                   "hill_climb": {"evaluations": len(hc.history), "best": hc.best_config,
                                  "best_val_loss": hc.best_score, "file": "hill_climb.json"},
                   "rnsga2": {"evaluations": len(ns.history), "front": len(ns.pareto_front),
                              "reference_points": ns.settings["reference_points"],
                              "evaluated_on_tests": [e.config for e in front],
                              "file": "rnsga2.json"}},
        "rows": rows, "comparisons": comparisons, "phases": ledger.phases,
        "this_invocation": {"wall_s": time.perf_counter() - start_wall,
                            "cpu_s": time.process_time() - start_cpu},
    }
    write_json(out / "results.json", results)
    print(table)
    print(f"wall {results['this_invocation']['wall_s']:.0f} s, process CPU "
          f"{results['this_invocation']['cpu_s']:.0f} s; everything is in {out}")
    return results


if __name__ == "__main__":
    main()
