"""save_adapter / load_adapter: bitwise round trip, JSON + safetensors only, clear errors."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_tiny, random_ids, randomize_adapters

from shears.adapters import (
    add_elastic_lora,
    elastic_modules,
    get_config,
    random_config,
    search_space,
    set_config,
)
from shears.export import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def trained_like(family="llama", **kw):
    """An adapted tiny model whose adapters hold random values (as after training)."""
    model = add_elastic_lora(make_tiny(family), kw.pop("targets", TARGETS), **kw)
    return randomize_adapters(model, seed=1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_round_trip_bitwise_logits(tmp_path, family):
    targets = TARGETS if family == "llama" else ["c_attn", "c_fc"]
    groups = (lambda n: re.sub(r"[qkv]_proj$", "qkv", n)) if family == "llama" else "layer"
    model = trained_like(family, targets=targets, ranks=[16, 8, 4], alpha=24.0, dropout=0.1,
                         groups=groups, sparse_adapter=True).eval()
    cfg = random_config(model, 5)
    set_config(model, cfg)
    save_adapter(model, tmp_path / "sa")
    assert sorted(p.name for p in (tmp_path / "sa").iterdir()) == sorted([CONFIG_NAME,
                                                                          WEIGHTS_NAME])
    loaded = load_adapter(make_tiny(family), tmp_path / "sa").eval()
    assert get_config(loaded) == cfg and search_space(loaded) == search_space(model)
    ids = random_ids(2, 12)
    for config in (cfg, random_config(model, 6)):
        set_config(model, config)
        set_config(loaded, config)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, loaded(ids).logits)
    m0 = dict(elastic_modules(loaded))
    assert all(m.sparse_adapter and m.alpha == 24.0 and m.dropout_p == 0.1 for m in m0.values())
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_files_are_json_and_safetensors(tmp_path):
    model = trained_like(ranks=[8, 4])
    save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["ranks"] == [8, 4] and meta["alpha"] == 64.0 and meta["sparse_adapter"] is False
    assert meta["config"] == get_config(model) and len(meta["targets"]) == 10
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    q = model.model.layers[1].self_attn.q_proj
    assert torch.equal(tensors["model.layers.1.self_attn.q_proj.lora_A"], q.lora_A)
    assert torch.equal(tensors["model.layers.1.self_attn.q_proj.lora_B"], q.lora_B)
    assert tensors["model.layers.0.mlp.down_proj.lora_A"].shape == (8, 128)


def test_load_into_already_adapted_model_overwrites_weights(tmp_path):
    model = trained_like(ranks=[8, 4])
    save_adapter(model, tmp_path)
    other = add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[8, 4])
    load_adapter(other, tmp_path)
    ids = random_ids(1, 8)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, other(ids).logits)
    mismatched = add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[8, 2])
    with pytest.raises(ValueError, match="ranks"):
        load_adapter(mismatched, tmp_path)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no elastic"):
        save_adapter(make_tiny("llama"), tmp_path)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_adapter(make_tiny("llama"), tmp_path / "nothing")
    save_adapter(trained_like(ranks=[8, 4]), tmp_path)
    with pytest.raises(ValueError, match="no module"):
        load_adapter(make_tiny("gpt2"), tmp_path)  # different architecture
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    key = "model.layers.0.mlp.up_proj.lora_B"
    tensors[key] = tensors[key][:, :4].contiguous()
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    fresh = make_tiny("llama")
    with pytest.raises(ValueError, match=re.escape(key)):
        load_adapter(fresh, tmp_path)
    assert not list(elastic_modules(fresh))  # checked before anything was attached
    del tensors[key]
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="missing tensors"):
        load_adapter(make_tiny("llama"), tmp_path)
