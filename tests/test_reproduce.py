"""examples/reproduce.py --smoke: every row, every output, the data rules, resumption.

The main test writes its own small LLM-Adapters-style data, so it knows how many records
must be dropped and held out; a second one runs the command line on the shared data when
that folder is present.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import reproduce
import torch

import shears
from shears.evaluation import evaluate_loss, extract_answer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"
ROWS = ["dense", "Wanda-pruned", "LoRA", "NLS maximal", "NLS heuristic", "NLS minimal",
        "NLS hill-climb", "NLS front search", "NLS R-NSGA-II"]


def _problem(i: int, right: bool = True, style: str = "") -> dict:
    a, b = 3 + i, 10 + 2 * i
    said = a + b if right else a + b + 1
    return {"instruction": f"{style}Tom has {a} apples and buys {b} more. How many apples "
                           f"does he have now (case {i})?",
            "input": "", "output": f"\nA: {a} + {b} = {said}. The answer is {said}.",
            "answer": f"{a + b}.0"}


def _letter(i: int, right: bool) -> dict:
    said = "B" if right else "C"
    return {"instruction": f"Pick the even number ({i}). Answer Choices: (A) 3 (B) {2 * i} (C) 5",
            "input": "", "output": f"\nRationale: it is even. The answer is ({said}).",
            "answer": "B"}


def write_data(folder: Path) -> None:
    """26 training records, 4 of them with a wrong rationale; test sets of which two gsm8k
    problems are copies of training ones (spacing and case changed); no MultiArith."""
    d = folder / "llm-adapters"
    d.mkdir(parents=True)
    train = [_problem(i, right=i not in (3, 7, 11)) for i in range(24)]
    train += [_letter(1, right=True), _letter(2, right=False)]
    tests = {
        "gsm8k": [_problem(100 + i) for i in range(4)]
        + [dict(_problem(0), instruction=_problem(0)["instruction"].upper()),
           dict(_problem(5), instruction=_problem(5)["instruction"].replace(" ", "  "))],
        "AQuA": [_letter(10 + i, right=True) for i in range(3)],
        "mawps": [dict(_problem(200 + i), output="") for i in range(3)],
        "AddSub": [_problem(300 + i) for i in range(3)],
        "SingleEq": [_problem(400 + i) for i in range(3)],
    }
    (d / "math_data.json").write_text(json.dumps(train))
    for name, records in tests.items():
        (d / f"{name}_test.json").write_text(json.dumps(records))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reproduce")
    write_data(tmp / "data")
    argv = ["--smoke", "--data", str(tmp / "data"), "--out", str(tmp / "out")]
    torch.set_num_threads(1)  # module fixture: runs before the per-test thread fixture
    return argv, tmp / "out", reproduce.main(argv)


def test_smoke_writes_every_output_and_row(smoke):
    _, out, results = smoke
    for name in ("results.json", "results.md", "search.png", "hill_climb.json", "rnsga2.json",
                 "front_search.json", "sensitivity.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "search.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "results.json").read_text())
    names = [r["row"] for r in saved["rows"]]
    table = (out / "results.md").read_text()
    assert names[: len(ROWS)] == ROWS
    assert len(names) <= len(ROWS) + 1  # --front-eval 2: the best and one more front member
    for name in names:
        assert f"| {name} |" in table
    assert len(saved["comparisons"]) == 5
    for key in ("args", "versions", "seeds", "records", "phases", "pruning", "this_invocation"):
        assert key in saved
    assert {"torch", "transformers", "shears"} <= set(saved["versions"])
    assert saved["args"]["nls_sample_every"] == "micro_batch"  # the authors' sampling, default
    assert saved["training"]["NLS"]["nls_sample_every"] == "micro_batch"
    assert saved["args"]["lr_scheduler"] == "cosine"  # the authors' schedule, no warm-up
    for phase in ("prune", "train: LoRA", "train: NLS", "search: hill-climb"):
        assert saved["phases"][phase]["wall_s"] >= 0 and "cpu_s" in saved["phases"][phase]
    assert results["rows"][0]["row"] == "dense"


def test_smoke_evaluates_with_the_references_decoding_and_answer_rule(smoke):
    """The paper's defaults: 4 beams and LLM-Adapters' answer extraction, recorded in
    results.json and results.md, and used for every evaluated record."""
    _, out, results = smoke
    assert results["evaluation"] == {"num_beams": 4, "max_new_tokens": 4,
                                     "answer_rule": "llm-adapters"}
    assert (out / "results.md").read_text().startswith(
        "Generation: 4-beam search, up to 4 new tokens; answers extracted by the llm-adapters")
    records = [(path.stem, r) for path in (out / "evals").rglob("*.json")
               for r in json.loads(path.read_text())["records"]]
    assert len(records) > 20
    for task, r in records:
        assert r["prediction"] == extract_answer(r["output"], task, rule="llm-adapters")
    defaults = reproduce.parse_args(["--data", "x"])
    assert (defaults.num_beams, defaults.answer_rule) == (4, "llm-adapters")
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--num-beams", "0"])


def test_smoke_data_rules(smoke):
    _, _, results = smoke
    train, tests = results["records"]["training"], results["records"]["tests"]
    assert train["records"] == 26 and train["dropped_wrong_answer"] == 4  # 3 numbers, 1 letter
    assert train["validation"] == 4 and train["train"] == 16
    assert tests["gsm8k"]["in_training"] == 2 and tests["gsm8k"]["held_out"] == 4
    assert tests["gsm8k"]["evaluated"] == 3  # --eval-records 3 under --smoke
    assert tests["MultiArith"] == {"missing": True}
    rows = {r["row"]: r for r in results["rows"]}
    assert set(rows["dense"]["tests"]) == {"gsm8k", "AQuA", "mawps", "AddSub", "SingleEq"}
    assert rows["dense"]["tests"]["mawps"]["loss"] is None  # no reference responses
    assert rows["dense"]["sparsity"] < 0.01 and rows["Wanda-pruned"]["sparsity"] == 0.5
    assert rows["dense"]["adapter_parameters"] == 0
    assert rows["LoRA"]["adapter_parameters"] == rows["NLS maximal"]["adapter_parameters"]
    assert (rows["NLS minimal"]["adapter_parameters"] < rows["NLS heuristic"]["adapter_parameters"]
            < rows["NLS maximal"]["adapter_parameters"])


def test_smoke_validation_losses_are_those_of_the_rows_sub_adapters(smoke):
    """Rebuild the pruned model, load the trained super-adapter and recompute each NLS row's
    validation loss under its own configuration."""
    argv, out, results = smoke
    args = reproduce.parse_args(argv)
    data = Path(args.data)
    _, kept, counts = reproduce.load_training("math", data)
    train, val = reproduce.split_training(kept, args, counts)
    model, tok = reproduce.load_model(args, torch.device("cpu"), torch.float32)
    reproduce.prune(model, tok, args, data, train, out)  # exits if the weights differ
    shears.load_adapter(model, out / "nls")
    rows = reproduce.response_rows(val, tok, args.cutoff)
    for row in results["rows"]:
        if row["config"] is not None:
            shears.set_config(model, row["config"])
            assert evaluate_loss(model, rows, batch_size=1) == pytest.approx(row["val_loss"],
                                                                            rel=1e-5)


def test_smoke_resumes_without_redoing_anything(smoke):
    argv, out, results = smoke
    evals = sorted((out / "evals").rglob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in evals] + [(out / "val_loss.jsonl").stat().st_mtime_ns]
    again = reproduce.main(argv)
    assert [p.stat().st_mtime_ns for p in evals] + [
        (out / "val_loss.jsonl").stat().st_mtime_ns] == stamps
    assert [(r["row"], r["val_loss"], r["average"]) for r in again["rows"]] == [
        (r["row"], r["val_loss"], r["average"]) for r in results["rows"]]
    assert again["phases"]["train: NLS"]["runs"] == 2


def test_other_settings_refuse_the_same_folder(smoke):
    argv, _, _ = smoke
    with pytest.raises(SystemExit, match="other settings"):
        reproduce.main(argv + ["--budget", "7"])


def test_folder_from_before_the_decoding_flags_resumes_only_with_greedy_and_shears_rule(
        smoke, tmp_path):
    argv, out, _ = smoke
    settings = json.loads((out / "settings.json").read_text())
    del settings["num_beams"], settings["answer_rule"]  # as written before the flags
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(SystemExit, match=r"other settings \(answer_rule, num_beams\)"):
        reproduce.check_settings(tmp_path, reproduce.parse_args(argv))
    reproduce.check_settings(tmp_path, reproduce.parse_args(
        argv + ["--num-beams", "1", "--answer-rule", "shears"]))


@pytest.mark.skipif(not (SHARED / "llm-adapters" / "boolq_train.json").exists(),
                    reason="shared data absent")
def test_command_line_smoke_on_shared_commonsense_data(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "examples" / "reproduce.py"), "--smoke", "--task",
           "commonsense", "--data", str(SHARED), "--out", str(tmp_path), "--eval-records", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["records"]["training"]["files"]) == {"boolq", "ARC-Easy", "ARC-Challenge",
                                                          "openbookqa"}
    assert "winogrande" in saved["rows"][0]["tests"]
    for name in ROWS:
        assert f"| {name} |" in done.stdout


def test_pattern_flag_prunes_n_of_every_m(tmp_path):
    write_data(tmp_path / "data")
    args = reproduce.parse_args(["--smoke", "--pattern", "2:4", "--data", str(tmp_path / "data")])
    _, kept, _ = reproduce.load_training("math", tmp_path / "data")
    model, tok = reproduce.load_model(args, torch.device("cpu"), torch.float32)
    summary = reproduce.prune(model, tok, args, tmp_path / "data", kept, tmp_path)
    assert summary["sparsity"] == 0.5
    w = model.model.layers[0].mlp.down_proj.weight  # (64, 128): blocks of 4 input columns
    assert ((w.reshape(64, 32, 4) == 0).sum(-1) >= 2).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_smoke_on_cuda(tmp_path):
    write_data(tmp_path / "data")
    results = reproduce.main(["--smoke", "--device", "cuda", "--data", str(tmp_path / "data"),
                              "--out", str(tmp_path / "out")])
    assert results["device"].startswith("cuda")
    assert [r["row"] for r in results["rows"]][: len(ROWS)] == ROWS
