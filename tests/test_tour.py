"""examples/tour.ipynb: it runs top to bottom, and the committed copy shows a real run.

The run uses ``SHEARS_TOUR_TINY=1`` (a tiny random Llama and a character tokenizer from
tests/tour_tiny.py) and a made-up data folder, in a fresh kernel of this interpreter. The
notebook is executed in memory: the committed file is never rewritten.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
TOUR = ROOT / "examples" / "tour.ipynb"
KERNEL = "shears-tour-test"


def write_tiny_data(root: Path) -> Path:
    """A data folder shaped like shared/data: WikiText-2 text and math_data.json records."""
    words = "the a model sparse adapter rank prune weight search loss of to and is".split()
    text = "\n".join(" ".join(words[(7 * i + j) % len(words)] for j in range(12)) + " ."
                     for i in range(200))
    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text(text)
    records = [{"instruction": f"What is {a} + {b}?", "input": "",
                "output": f"{a} + {b} = {a + b}. The answer is {a + b}.", "answer": str(a + b)}
               for a in range(4) for b in range(4)]
    (root / "llm-adapters").mkdir()
    (root / "llm-adapters" / "math_data.json").write_text(json.dumps(records))
    return root


def kernel_for_this_python(jupyter_path: Path) -> None:
    """A kernelspec that starts this very interpreter (the venv's), whatever else is installed."""
    spec = jupyter_path / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps(
        {"argv": argv, "display_name": KERNEL, "language": "python"}))


def outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if kind in o.get("data", {}) or (kind == "stream" and o.output_type == "stream")]


def text_of(nb) -> str:
    return "".join(o["text"] for o in outputs(nb, "stream"))


def test_tour_runs_on_a_tiny_model(tmp_path, monkeypatch):
    kernel_for_this_python(tmp_path / "jupyter")
    pythonpath = [str(ROOT), str(ROOT / "tests"), str(ROOT / "examples"),
                  *filter(None, [os.environ.get("PYTHONPATH")])]
    for name, value in {
        "SHEARS_TOUR_TINY": "1",
        "SHEARS_DATA_DIR": str(write_tiny_data(tmp_path / "data")),
        "JUPYTER_PATH": str(tmp_path / "jupyter"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "TMPDIR": str(tmp_path),  # the notebook's temporary folders land here
        "PYTHONPATH": os.pathsep.join(pythonpath),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }.items():
        monkeypatch.setenv(name, value)
    before = TOUR.read_bytes()
    nb = nbformat.read(TOUR, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=120,
                                     resources={"metadata": {"path": str(ROOT / "examples")}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on failure

    assert TOUR.read_bytes() == before, "executing the tour must not rewrite the committed file"
    text = text_of(nb)
    assert "LlamaForCausalLM" in text and "decoder blocks" in text
    assert "to 50.00% sparsity" in text  # Wanda, tiny Llama: every row has an even width
    assert "dense" in text and "Wanda 50%" in text
    for name in ("minimal", "heuristic", "maximal"):
        assert re.search(rf"{name} +sub-adapter: +held-out loss \d", text), name
    assert "hill-climb's best: True" in text
    assert "super_adapter.safetensors" in text
    assert "plain from_pretrained: 0 missing" in text  # the pruned base, complete
    diff = float(re.search(r"max \|logit difference\| (\S+)", text).group(1))
    assert diff <= 1e-5, "stock PEFT must reproduce the exported sub-adapter"
    assert "sparsity of the pruned maps 50.00%" in text  # merge_adapters kept every zero
    assert len(outputs(nb, "image/png")) == 1, "plot_search should draw one inline figure"
    noise = [o["text"][:200] for o in outputs(nb, "stream") if o["name"] == "stderr"
             and any(s in o["text"] for s in ("IProgress", "it/s", "%|"))]
    assert not noise, f"progress bars or their warnings leak into the tour: {noise}"


def test_committed_tour_shows_a_real_run():
    """The saved copy was executed top to bottom on SmolLM2, and is small enough to read."""
    nb = nbformat.read(TOUR, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"not run top to bottom: {counts}"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    stderr = [o["text"][:200] for o in outputs(nb, "stream") if o["name"] == "stderr"]
    assert not stderr, f"the saved tour shows warnings or progress bars: {stderr}"
    text = text_of(nb)
    assert "LlamaForCausalLM: 134,515,008 parameters, 30 decoder blocks" in text, (
        "the committed tour must be the SmolLM2-135M run (not the tiny test run)")
    assert len(outputs(nb, "image/png")) == 1
    assert TOUR.stat().st_size < 200_000, "keep the committed notebook small"
    assert nb.cells[-1].cell_type == "markdown" and "deploy.md" in nb.cells[-1].source
