"""vLLM serves shears' exports as transformers runs them (opt-in; docs/deploy.md, "vLLM").

A tiny random Llama goes through benchmarks/vllm_prepare.py here (Wanda, INT4 +
QA-SparsePEFT + ``export_compressed``; dense adapters + ``export_peft``; transformers and
stock PEFT give the reference), then benchmarks/vllm_check.py serves it with vLLM in its own
environment. The figures vLLM returns are judged here again, from its raw outputs.

Runs when ``$SHEARS_VLLM_PYTHON`` names a python that imports vllm (``.ci/run`` builds one
with ``.ci/vllm_env``, best effort); skips, saying why, otherwise. When vLLM runs and
disagrees with transformers, the test fails.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "vllm_check.py"
TIMEOUT = 900  # seconds for one vllm_check.py run (about 30 s on an idle 2-core CPU)


def vllm_python() -> str:
    """The vLLM environment's python, or a skip that says why there is none."""
    python = os.environ.get("SHEARS_VLLM_PYTHON")
    if not python:
        pytest.skip("SHEARS_VLLM_PYTHON is not set: `bash .ci/vllm_env` builds a vLLM "
                    "environment, then SHEARS_VLLM_PYTHON=.venv-vllm/bin/python")
    try:
        probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True,
                               timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot run SHEARS_VLLM_PYTHON={python}: {e}")
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["no message"])[-1]
        pytest.skip(f"vllm does not import in SHEARS_VLLM_PYTHON={python}: {last}")
    return python


def data_folder() -> Path:
    folder = Path(os.environ.get("SHEARS_DATA_DIR") or ROOT.parent / "shared" / "data")
    if not (folder / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip(f"WikiText-2 is not under {folder} (set SHEARS_DATA_DIR)")
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(artefacts folder, python)``, the tiny model's exports and references written."""
    data = data_folder()
    pytest.importorskip("peft")
    pytest.importorskip("compressed_tensors")
    python = vllm_python()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vllm_prepare import main as prepare

    out = tmp_path_factory.mktemp("vllm")
    prepare(["--model", "tiny", "--data", str(data), "--out", str(out)])
    return out, python


def run_check(python: str, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([python, str(CHECK), str(folder), *extra], capture_output=True,
                          text=True, timeout=TIMEOUT, env=env)


def _log_ppl(rows):
    return -sum(map(sum, rows)) / sum(map(len, rows))


def test_vllm_serves_int4_and_lora_as_transformers(served):
    folder, python = served
    proc = run_check(python, folder, "--json", str(folder / "result.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((folder / "result.json").read_text())
    ref = json.loads((folder / "reference.json").read_text())
    # (a) vLLM's own log-probabilities, judged against transformers' fp32 ones: the shift of
    # ln(perplexity) within twice what bf16 costs transformers (plus a 0.2% floor).
    got, fp32 = result["int4"]["vllm_logprobs"], ref["logprobs"]["float32"]
    bf16 = ref["logprobs"]["bfloat16"]
    assert [len(r) for r in got] == [len(w) - 1 for w in ref["windows"]]
    noise = abs(_log_ppl(bf16) - _log_ppl(fp32))
    assert abs(_log_ppl(got) - _log_ppl(fp32)) <= 2 * noise + 0.002
    assert math.isfinite(_log_ppl(got))
    # (b) greedy tokens: fp32 equal to transformers (base) and stock PEFT (base + LoRA) on
    # every kept prompt, and the adapter changes vLLM's output on each of them
    lora = result["lora"]["float32"]
    assert len(ref["greedy"]) >= 8
    assert lora["base_tokens"] == [r["base_float32"] for r in ref["greedy"]]
    assert lora["lora_tokens"] == [r["lora_float32"] for r in ref["greedy"]]
    assert all(a != b for a, b in zip(lora["lora_tokens"], lora["base_tokens"], strict=True))
    assert all(len(t) == ref["new_tokens"] for t in lora["lora_tokens"])


def test_vllm_check_fails_when_the_outputs_disagree(served, tmp_path):
    """The check has teeth: a reference whose adapted continuations are the base's fails."""
    folder, python = served
    ref = json.loads((folder / "reference.json").read_text())
    for row in ref["greedy"]:
        row["lora_float32"] = row["base_float32"]
    for name in ("pruned", "peft"):
        (tmp_path / name).symlink_to(folder / name)
    (tmp_path / "reference.json").write_text(json.dumps(ref))
    proc = run_check(python, tmp_path, "--part", "b", "--lora-dtype", "float32",
                     "--json", str(tmp_path / "result.json"))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    lora = json.loads((tmp_path / "result.json").read_text())["lora"]["float32"]
    assert lora["lora_equal"] == 0 and lora["base_equal"] == lora["prompts"] and not lora["ok"]
