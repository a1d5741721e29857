"""load_task and drop_overlap on small JSON files written here (and the shared data if present)."""

import json
from pathlib import Path

import pytest

from shears.evaluation import COMMONSENSE_TASKS, MATH_TASKS, TASKS, drop_overlap, load_task

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "llm-adapters"


def _write(folder: Path, name: str, records: list[dict]) -> None:
    (folder / name).write_text(json.dumps(records), encoding="utf-8")


def _rec(instruction: str, answer: str = "1") -> dict:
    return {"instruction": instruction, "input": "", "output": "", "answer": answer}


def test_task_lists():
    assert len(TASKS) == 15 and set(MATH_TASKS) | set(COMMONSENSE_TASKS) == set(TASKS)
    assert "AQuA" in MATH_TASKS and "hellaswag" in COMMONSENSE_TASKS


def test_load_by_folder_any_case_and_limit(tmp_path):
    recs = [_rec("a"), _rec("b"), _rec("c")]
    _write(tmp_path, "AQuA_test.json", recs)
    assert load_task("aqua", tmp_path) == recs
    assert load_task("AQuA", tmp_path / "AQuA_test.json", limit=2) == recs[:2]


def test_data_dir_from_environment(tmp_path, monkeypatch):
    _write(tmp_path, "boolq_train.json", [_rec("x", "true")])
    monkeypatch.setenv("SHEARS_DATA_DIR", str(tmp_path))
    assert load_task("boolq", split="train")[0]["answer"] == "true"
    monkeypatch.delenv("SHEARS_DATA_DIR")
    with pytest.raises(FileNotFoundError, match="SHEARS_DATA_DIR"):
        load_task("boolq")


def test_data_root_with_llm_adapters_subfolder(tmp_path):
    (tmp_path / "llm-adapters").mkdir()
    _write(tmp_path / "llm-adapters", "piqa_test.json", [_rec("y", "solution2")])
    assert load_task("piqa", tmp_path)[0]["answer"] == "solution2"


def test_missing_file_names_the_expected_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="SVAMP_test.json"):
        load_task("SVAMP", tmp_path)
    with pytest.raises(FileNotFoundError, match="hellaswag_test.json"):
        load_task("hellaswag", tmp_path)


def test_unknown_task(tmp_path):
    with pytest.raises(KeyError, match="unknown task"):
        load_task("svamp2", tmp_path)


def test_drop_overlap_ignores_spacing_punctuation_and_case(tmp_path):
    train = [_rec("A corporation has 2,041 employees. How many work there?")]
    test = [_rec(" A corporation has 2041 employees . How many work there ? "),
            _rec("a CORPORATION has 2041 employees, how many work there"),
            _rec("A corporation has 2042 employees. How many work there?")]
    assert drop_overlap(test, train) == test[2:]
    _write(tmp_path, "gsm8k_test.json", test)
    assert load_task("gsm8k", tmp_path, exclude=train) == test[2:]
    assert load_task("gsm8k", tmp_path, exclude=train, limit=0) == []


@pytest.mark.skipif(not (SHARED / "gsm8k_test.json").exists(), reason="shared data absent")
def test_shared_gsm8k_overlap_with_math_data():
    test = load_task("gsm8k", SHARED)
    held_out = load_task("gsm8k", SHARED, exclude=load_task("gsm8k", SHARED / "math_data.json"))
    assert len(test) == 1319
    assert len(held_out) == 1319 - 1055  # math_data.json holds 80% of the test problems
