"""shears works without bitsandbytes: the NF4 code is reached only through a Linear4bit,
which cannot exist unless bitsandbytes was imported."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
sys.modules["bitsandbytes"] = None  # importing it now fails, as when it is not installed
sys.path.insert(0, "tests")
import torch
from tiny import make_tiny, random_ids
import shears
from shears.quantization.bnb import dequantized_weight
model = make_tiny("llama")
shears.add_elastic_lora(model, ["q_proj", "v_proj"], ranks=[8, 4], sparse_adapter=True)
model(random_ids())
shears.merge_adapters(model)
try:
    dequantized_weight(torch.nn.Linear(2, 2))
except ImportError as e:
    print("ImportError:", e)
"""


def test_adapters_train_and_merge_without_bitsandbytes():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(ROOT),
                                                       "OMP_NUM_THREADS": "1",
                                                       "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pip install 'shears[quant]'" in proc.stdout
