"""docs/deploy.md: its snippets run as written, in order (the CUDA one only with a GPU)."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"


def test_deploy_snippets_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 8
    monkeypatch.chdir(tmp_path)  # the snippets write under out/
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    out = capsys.readouterr().out
    assert "share of the adapters' update removed" in out  # the dense-merge warning
    assert "keep_sparsity=False" in out and "export_peft" in out  # the default's refusal
    assert namespace["shears"].sparsity_report(namespace["merged"]).sparsity == 0.5
    assert (tmp_path / "out" / "peft-sub-adapter" / "adapter_config.json").is_file()
    assert (namespace["shipped"](namespace["ids"]).logits
            - namespace["adapted"]).abs().max() < 1e-4  # section 5: the INT4 way out
