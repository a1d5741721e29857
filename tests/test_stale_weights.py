"""Re-saving into a folder that held another weight layout (issue 17, section 8).

transformers 5.x ``save_pretrained`` removes the shards it does not rewrite but keeps a stale
``model.safetensors.index.json`` when it re-saves unsharded, and keeps a stale
``model.safetensors`` when it re-saves sharded (``from_pretrained`` then loads the stale
file). shears' readers and writers must not follow either."""

import pytest
import torch
import transformers as T
from export_models import logits, pruned_adapted
from tiny import make_tiny

import shears
from shears.export import load_adapter

pytest.importorskip("compressed_tensors")
SHARDED = dict(max_shard_size="100KB")


def names(d):
    return sorted(p.name for p in d.iterdir())


def test_load_adapter_ignores_an_index_whose_shards_are_gone(tmp_path):
    _, old = pruned_adapted(seed=0)
    old.save_pretrained(tmp_path, **SHARDED)
    _, new = pruned_adapted(seed=1)
    new.save_pretrained(tmp_path)  # transformers leaves the old index behind
    assert "model.safetensors.index.json" in names(tmp_path)
    base, _ = pruned_adapted(seed=1)
    assert torch.equal(logits(load_adapter(base, tmp_path)), logits(new))


def test_load_adapter_refuses_both_layouts_complete(tmp_path):
    _, old = pruned_adapted(seed=0)
    old.save_pretrained(tmp_path)
    _, new = pruned_adapted(seed=1)
    new.save_pretrained(tmp_path, **SHARDED)  # transformers leaves model.safetensors behind
    base, _ = pruned_adapted(seed=1)
    with pytest.raises(ValueError, match=f"{tmp_path} holds model.safetensors and model."
                                         "safetensors.index.json with all its shards"):
        load_adapter(base, tmp_path)


def test_load_adapter_names_a_missing_shard(tmp_path):
    _, model = pruned_adapted(seed=0)
    model.save_pretrained(tmp_path, **SHARDED)
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    (tmp_path / shards[1]).unlink()
    base, _ = pruned_adapted(seed=0)
    with pytest.raises(FileNotFoundError, match=shards[1]):
        load_adapter(base, tmp_path)


def quantized(seed):
    model = make_tiny("llama", seed=seed)
    shears.wanda_prune(model, method="magnitude", sparsity=0.5, progress=False)
    shears.quantize_base(model, group_size=32)
    return model


def test_export_compressed_removes_the_other_layout_and_keeps_other_files(tmp_path):
    (tmp_path / "README.md").write_text("mine")
    (tmp_path / "model.fp16.safetensors").write_bytes(b"another variant: not ours to touch")
    quantized(0).save_pretrained(tmp_path)  # unsharded ...
    shears.export_compressed(quantized(1), tmp_path, **SHARDED)  # ... then sharded
    files = names(tmp_path)
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert {"README.md", "model.fp16.safetensors"} <= set(files)
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(again), logits(quantized(1)))
    shears.export_compressed(quantized(0), tmp_path)  # sharded -> unsharded: no stale index
    files = names(tmp_path)
    assert "model.safetensors.index.json" not in files
    assert not [f for f in files if "-of-" in f]
    assert torch.equal(logits(T.AutoModelForCausalLM.from_pretrained(tmp_path)),
                       logits(quantized(0)))
