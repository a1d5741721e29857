"""Two torchrun processes (gloo) draw the same sub-adapter at every NLS step or micro-batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "check_nls_distributed.py"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_processes_draw_identical_configs():
    # --standalone picks a free port, so concurrent runs on one machine do not collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(SCRIPT), "--steps", "6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    # About 20 s: two processes each start Python, torch and transformers.
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "NLS-DISTRIBUTED-OK" in out.stdout
    for every in ("step", "micro_batch"):  # both sampling modes, one after the other
        part = out.stdout.split(f"nls_sample_every={every}:")[1]
        assert part.split("\n")[1].startswith(
            "rank 1: same configs True, same adapter weights True"), out.stdout
