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
    checks = [line for line in out.stdout.splitlines() if line.startswith("CHECK ")]
    names = [line.split()[1] for line in checks]
    expected = ["cpu_fallback", "slicing[reshard_after_forward=True,",
                "slicing[reshard_after_forward=False,", "configs", "gradients", "weights",
                "checkpoints", "save_adapter"]
    for name in expected:
        assert name in names, checks
    assert all(line.split()[-1] != "FAILED" and " FAILED " not in line for line in checks), checks
    assert "NLS-FSDP-OK" in out.stdout

