"""NLS under FSDP2: two torchrun processes (gloo, CPU) against a single-process run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "check_nls_fsdp.py"


def _has_fully_shard() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (torch >= 2.6)
    except ImportError:
        return False
    return torch.distributed.is_available()


@pytest.mark.skipif(not _has_fully_shard(), reason="needs torch.distributed.fsdp.fully_shard")
def test_fsdp2_matches_single_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(SCRIPT), "--steps", "6", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    # About 12-20 s: two processes start Python, torch and transformers, then train 6 steps.
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    checks = dict(line.split()[1:3] for line in out.stdout.splitlines()
                  if line.startswith("CHECK "))  # name -> "ok" | "FAILED"
    expected = ["cpu_fallback", "slicing[reshard_after_forward=True,base=float32]",
                "slicing[reshard_after_forward=False,base=float32]",
                "slicing[reshard_after_forward=True,base=bfloat16]", "configs", "gradients",
                "weights", "checkpoints", "save_adapter", "micro_batch"]
    assert {name: checks.get(name) for name in expected} == dict.fromkeys(expected, "ok"), \
        out.stdout[-4000:]
    assert "NLS-FSDP-OK" in out.stdout

