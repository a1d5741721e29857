"""The benchmarks' download-free paths, on CPU with tiny shapes: what a GPU session will run."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _env(tmp_path: Path) -> dict:
    """No `datasets`, as on the GPU image: find_spec says None and importing it fails."""
    block = tmp_path / "no_datasets"
    block.mkdir()
    (block / "sitecustomize.py").write_text('import sys\n\nsys.modules["datasets"] = None\n')
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{block}", "OMP_NUM_THREADS": "1",
            "PYTHON": sys.executable, "SHEARS_GPU_CHECKS_SMOKE": "1"}


def test_presets_have_the_published_parameter_counts():
    sys.path.insert(0, str(BENCH))
    from random_llama import random_llama

    # Llama-2-7B: 6,738,415,616. TinyLlama-1.1B: 1,100,048,384 with 22 blocks of 44,044,288;
    # the 1B preset keeps 16 of them.
    counts = {n: sum(p.numel() for p in random_llama(n, device="meta").parameters())
              for n in ("random-1b", "random-7b")}
    assert counts == {"random-1b": 1_100_048_384 - 6 * 44_044_288, "random-7b": 6_738_415_616}


def test_gpu_checks_script_runs_its_steps_on_cpu(tmp_path):
    out = tmp_path / "out"
    cmd = ["bash", str(BENCH / "gpu_checks.sh"), str(out), "nls", "prune", "profile"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    nls = json.loads((out / "nls.json").read_text())
    assert set(nls["runs"]) == {"peft", "nls", "nls_max"}
    for side, runs in nls["runs"].items():
        assert runs[0]["tokens_per_s"] > 0 and runs[0]["base_dtype"] == "torch.bfloat16", side
    # The same trainable parameters on both sides: PEFT r=32 and the r_max=32 super-adapter.
    assert len({runs[0]["trainable"] for runs in nls["runs"].values()}) == 1
    assert 16 <= nls["runs"]["nls"][0]["mean_rank"] <= 32
    assert nls["runs"]["nls_max"][0]["mean_rank"] == 32

    prune = json.loads((out / "prune.json").read_text())
    impls = prune["implementations"]
    assert set(impls) == {"reference", "shears batch 1 (default)", "shears batch 8"}
    assert prune["dtype"] == "torch.bfloat16" and prune["blocks"] == 2
    assert impls["shears batch 1 (default)"]["mask_agreement"] >= 0.99
    assert "aten::" in (out / "prune_profile.txt").read_text()


def test_bench_prune_batch_one_reproduces_the_reference_masks(tmp_path):
    # fp32: the reference-style implementation and wanda_prune(batch_size=1) agree bit for bit.
    out = tmp_path / "prune.json"
    cmd = [sys.executable, str(BENCH / "bench_prune.py"), "--model", "random-tiny", "--device",
           "cpu", "--nsamples", "8", "--seqlen", "32", "--repeats", "1", "--batch-sizes", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    impls = json.loads(out.read_text())["implementations"]
    assert impls["shears batch 1 (default)"]["block_agreement"] == [1.0, 1.0]
    assert all(r["time_s"] > 0 and r["peak_mib"] > 0 for r in impls.values())


def test_gpu_checks_nls4_step_runs_over_an_nf4_base_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    cmd = ["bash", str(BENCH / "gpu_checks.sh"), str(out), "nls4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    nls = json.loads((out / "nls4.json").read_text())
    assert set(nls["runs"]) == {"peft", "nls", "nls_max", "nls_unquantized"}
    # random-tiny: 2 blocks x 7 linear maps in NF4 on the three quantized sides, none on the last
    assert {s: r[0]["nf4_maps"] for s, r in nls["runs"].items()} == \
        {"peft": 14, "nls": 14, "nls_max": 14, "nls_unquantized": 0}
    assert len({runs[0]["trainable"] for runs in nls["runs"].values()}) == 1
    ratios = nls["nf4_vs_unquantized"]
    assert ratios["throughput_ratio"] > 0 and ratios["peak_ratio"] > 0


def test_search_budget_smoke_runs_every_phase_and_reports(tmp_path):
    """benchmarks/search_budget.py --smoke: training, curves, the estimate's correlation, the
    searches within the heuristic's size and the front plot; a rerun evaluates nothing.
    (It trains, so it needs ``datasets``: not the GPU image's environment of ``_env``.)"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    cmd = [sys.executable, str(BENCH / "search_budget.py"), "--smoke", "--out", str(out),
           "--phases", "train,curve,correlation,search,confirm,accuracy,plot",
           "--correlation-configs", "6"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = out / "search"
    corr = json.loads((folder / "correlation.json").read_text())
    for entry in corr["sets"].values():
        assert len(entry["measured"]) == 6 and "tangent at maximal" in entry["estimators"]
    found = json.loads((folder / "searches.json").read_text())
    limit = found["heuristic"]["params"]
    for budget in (16, 32):
        for name in ("hill-climb (today's)", "ordered climb", "front search"):
            e = found[f"{name} @{budget}"]
            assert e["params"] <= limit and e["val"] <= found["heuristic"]["val"] + 1e-12
            assert e["spent"] <= budget + 1e-9 and "test" in e
    confirmed = json.loads((folder / "confirm.json").read_text())
    assert set(confirmed) == set(found) - {"heuristic"}
    for name, e in confirmed.items():  # the heuristic unless the pick won on fresh records
        kept = found[name]["config"] if e["accepted"] else found["heuristic"]["config"]
        assert e["config"] == kept and e["params"] <= limit and "test" in e
        if e["accepted"]:
            assert e["confirm"] < e["confirm_scores"]["reference"]
    acc = json.loads((folder / "accuracy-summary.json").read_text())
    assert set(acc) == {"heuristic"} | {n for n, e in confirmed.items() if e["accepted"]}
    assert acc["heuristic"]["right_only_here"] == 0 and 0 <= acc["heuristic"]["mean"] <= 1
    assert (folder / "front.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((folder / "timing.json").read_text())["ratio"] > 0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and "chunks computed in this run: 0;" in again.stdout
    report = subprocess.run([sys.executable, str(BENCH / "search_budget.py"), "--smoke",
                             "--report", str(out)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert "| front search @32 |" in report.stdout and "| tangent at maximal |" in report.stdout
    assert "confirmed against the heuristic" in report.stdout


def test_judge_records_extend_the_slice_with_unseen_pool_records():
    """search_budget's larger judge: the validation slice first, then records the training
    never saw (no shared problem); the confirmation records share none with either; the
    training split unchanged."""
    sys.path.insert(0, str(BENCH))
    import reproduce as rp
    import search_budget as sb

    # 80 records, problems 0..59; problems 0..19 occur twice (as math_data.json's repeats)
    kept = [{"instruction": f"Problem {i % 60}?", "input": "", "output": str(i)}
            for i in range(80)]
    args, _ = sb.parse(["--steps", "1", "--val-records", "8", "--records", "20",
                        "--judge-records", "24", "--confirm-records", "10"])
    counts: dict = {}
    train, val = rp.split_training(kept, args, counts)
    judge, confirm = sb.judge_records(kept, args, train, val, counts)
    assert judge[: len(val)] == val and len(judge) == 24 == counts["judge"]
    assert len(confirm) == 10 == counts["confirmation"]
    assert rp.split_training(kept, args, {}) == (train, val)  # training as it was
    problems = [{r["instruction"] for r in part} for part in (train, judge, confirm)]
    assert not problems[0] & problems[1] and not problems[2] & (problems[0] | problems[1])
    args.judge_records = 0
    assert sb.judge_records(kept, args, train, val, {})[0] == val
    args.judge_records = 70
    with pytest.raises(SystemExit, match="unseen records"):
        sb.judge_records(kept, args, train, val, {})


def test_judge_strata_hold_unseen_problems_of_each_test_set(tmp_path):
    """judge_strata: a stratum per test set, of unseen pool problems of that set and its
    unevaluated held-out records; none trained on, evaluated, or in two roles; wrong
    rationales left out; the judge and confirmation split in the ratio asked."""
    sys.path.insert(0, str(BENCH))
    import judge_strata as js

    def rec(i, answer=None):
        return {"instruction": f"Problem {i}?", "input": "", "answer": str(i),
                "output": f"The answer is {i if answer is None else answer}."}

    tests = {"gsm8k": [rec(i) for i in range(0, 40)], "SingleEq": [rec(i) for i in range(40, 60)]}
    for name, recs in tests.items():
        (tmp_path / f"{name}_test.json").write_text(json.dumps(recs))
    raw = [rec(i) for i in range(0, 50, 2)]  # the training file: even problems below 50
    train = raw[:5]                          # problems 0, 2, .., 8
    unseen = rp_drop(raw[5:], train) + [rec(61), rec(12, answer=13)]  # 13: a wrong rationale
    evaluated = {"gsm8k": [rec(1), rec(3)], "SingleEq": [rec(41)],
                 "AddSub": [rec(70, answer=71)]}  # no right response: not in the held-out mean
    args = types.SimpleNamespace(judge_records=12, confirm_records=6, seed=0)
    judge, confirm, counts = js.stratified_records(unseen, evaluated, raw, tmp_path, args)
    trained = {r["instruction"] for r in train}
    seen = trained | {r["instruction"] for recs in evaluated.values() for r in recs}
    roles = [{r["instruction"] for recs in part.values() for r in recs}
             for part in (judge, confirm)]
    assert not roles[0] & roles[1] and not (roles[0] | roles[1]) & seen
    for name, part in (*judge.items(), *confirm.items()):
        problems = {int(r["instruction"].split()[1][:-1]) for r in part}
        assert problems <= {i for r in tests[name] for i in [int(r["answer"])]}
        assert all(r["task"] == name and r["output"].endswith(f"{r['answer']}.") for r in part)
    assert [len(judge[n]) for n in tests] == [6, 6] and [len(confirm[n]) for n in tests] == [3, 3]
    assert counts["gsm8k"]["judge"] == 6 and set(judge) == set(confirm) == set(tests)


def rp_drop(records, training):
    sys.path.insert(0, str(BENCH))
    import reproduce as rp
    return rp.drop_overlap(records, training)


def test_search_budget_smoke_judges_on_strata(tmp_path):
    """--judge-strata: the judge's batches carry the strata's weights (their counts over one
    configuration sum to 1, a mean over strata, not a token count) and the searches run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(BENCH / "search_budget.py"), "--smoke", "--out",
                           str(out), "--phases", "train,search,confirm", "--judge-strata",
                           "--searches", "front", "--budgets", "16"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts: dict = {}
    for line in (out / "search" / "chunks.jsonl").read_text().splitlines():
        e = json.loads(line)
        counts.setdefault(e["key"], []).append(e["count"])
    full = [c for c in counts.values() if len(c) == 4]  # 4 chunks: every record scored
    assert full and all(sum(c) == pytest.approx(1.0) for c in full)
    found = json.loads((out / "search" / "searches.json").read_text())
    assert found["front search @16"]["params"] <= found["heuristic"]["params"]
