"""benchmarks/bench_sparse_inference.py: exits cleanly without CUDA; its flow runs on CPU."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sparse_inference.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU machine")
def test_without_cuda_it_says_so_and_exits_0():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "needs CUDA" in proc.stdout and "nothing measured" in proc.stdout


def test_smoke_run_of_the_whole_flow_on_cpu(tmp_path):
    """--smoke: tiny shapes, dense kernels on both sides; checks the script, not speed."""
    spec = importlib.util.spec_from_file_location("bench_sparse_inference", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "smoke.json"
    rc = bench.main(["--smoke", "--models", "llama-7b-shapes", "--hidden", "64",
                     "--intermediate", "128", "--heads", "4", "--vocab", "128", "--layers", "2",
                     "--batch", "2", "--seqlen", "8", "--prompt", "4", "--steps", "2",
                     "--agree-steps", "3", "--iters", "1", "--warmup", "1", "--json", str(out)])
    assert rc == 0
    sides = json.loads(out.read_text())["llama-7b-shapes"]["sides"]
    assert set(sides) == {"dense", "dense-copy"}
    assert set(sides["dense"]) == {"parameter_mib", "prefill", "decode_b1", "decode_b16"}
    assert sides["dense-copy"]["agreement"] == {"logits_max_abs_diff_rel": 0.0,
                                               "top1_agreement": 1.0, "greedy_identical": 1.0,
                                               "greedy_first_divergence": None}
