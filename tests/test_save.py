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
    with pytest.raises(ValueError, match="two different saves"):  # the digest sees it first
        load_adapter(make_tiny("llama"), tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    del meta["adapter_digest"]  # as written before the digest existed: the shapes are checked
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    fresh = make_tiny("llama")
    with pytest.raises(ValueError, match=re.escape(key)):
        load_adapter(fresh, tmp_path)
    assert not list(elastic_modules(fresh))  # checked before anything was attached
    del tensors[key]
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="missing tensors"):
        load_adapter(make_tiny("llama"), tmp_path)


# ---- an already adapted model: every field of the layout must match (issue 12, 2b) -------


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v)
                                                 for k, v in before.items())


SAVED = dict(ranks=[8, 4], alpha=16.0, dropout=0.0, sparse_adapter=False, groups="module")
DIFFERENT = {  # field named in the error -> the already adapted model's differing layout
    "ranks": dict(ranks=[8, 2]),
    "alpha": dict(alpha=32.0),
    "dropout": dict(dropout=0.1),
    "sparse_adapter": dict(sparse_adapter=True),
    "groups": dict(groups="qkv"),
    "targets": dict(targets=["q_proj", "k_proj", "v_proj", "up_proj"]),
}


@pytest.mark.parametrize("field", list(DIFFERENT))
def test_load_into_adapted_model_refuses_any_layout_difference_before_changing(tmp_path,
                                                                             field):
    save_adapter(trained_like(**SAVED), tmp_path)
    other = trained_like(**{**SAVED, **DIFFERENT[field]})
    set_config(other, random_config(other, 2))
    before, active = state(other), get_config(other)
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        load_adapter(other, tmp_path)
    assert same_state(other, before) and get_config(other) == active


def test_rank_mode_does_not_change_the_maths_so_the_model_keeps_its_own(tmp_path):
    model = trained_like(**SAVED)
    save_adapter(model, tmp_path)  # saved in "slice" mode
    other = add_elastic_lora(make_tiny("llama"), TARGETS, **SAVED, rank_mode="mask")
    load_adapter(other, tmp_path)
    assert {m.rank_mode for _, m in elastic_modules(other)} == {"mask"}
    ids = random_ids(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


# ---- adapters on a submodule (issue 12, 2c) ------------------------------------------------


def test_save_and_load_adapter_with_a_submodule(tmp_path):
    model = make_tiny("llama")
    add_elastic_lora(model.model, TARGETS, ranks=[8, 4], groups="qkv")
    randomize_adapters(model, seed=1)
    set_config(model, random_config(model, 3))
    ids = random_ids(2, 8)
    with torch.no_grad():
        expected = model(ids).logits
    save_adapter(model.model, tmp_path / "sub")  # names relative to model.model
    save_adapter(model, tmp_path / "root")  # names relative to the whole model
    for saved in ("sub", "root"):
        for where in ("root", "sub"):
            fresh = make_tiny("llama")
            load_adapter(fresh if where == "root" else fresh.model, tmp_path / saved)
            with torch.no_grad():
                assert torch.equal(fresh(ids).logits, expected), (saved, where)
            assert get_config(fresh) == get_config(model)


# ---- a fingerprint of the base (issue 12, 2g) ---------------------------------------------


def pruned_tiny(seed=0):
    from shears.pruning import wanda_prune

    model = make_tiny("llama", seed=seed)
    wanda_prune(model, random_ids(4, 16, seed=7), 0.5, progress=False)
    return model


def hand_fingerprint(w):
    """The documented fingerprint of an (out, in) weight, computed here from scratch."""
    out_f, in_f = w.shape
    rows = range(0, out_f, max(1, out_f // 64))
    cols = range(0, in_f, max(1, in_f // 64))
    sample = [float(w[i, j]) for i in rows for j in cols]
    return {"shape": [out_f, in_f], "zeros": sum(float(x) == 0.0 for x in w.flatten()),
            "abs_sum": sum(abs(x) for x in sample), "sum": sum(sample)}


def test_fingerprint_describes_the_base_as_saved_in_both_formats(tmp_path):
    from transformers import AutoModelForCausalLM

    model = add_elastic_lora(pruned_tiny(), TARGETS, ranks=[8, 4])
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # the base changes after add_elastic_lora (e.g. pruned later)
        q.base_layer.weight[:, :16] = 0
    save_adapter(model, tmp_path / "sa")
    model.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "sa" / CONFIG_NAME).read_text())["base_fingerprint"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["shears_super_adapter"]["base_fingerprint"] == saved
    assert list(saved) == [n for n, _ in elastic_modules(model)]
    for name, m in elastic_modules(model):
        hand = hand_fingerprint(m.base_layer.weight.detach())
        assert saved[name]["shape"] == hand["shape"] and saved[name]["zeros"] == hand["zeros"]
        for key in ("abs_sum", "sum"):
            assert saved[name][key] == pytest.approx(hand[key], rel=1e-9, abs=1e-9)
    assert saved["model.layers.0.self_attn.q_proj"]["zeros"] > 64 * 32  # the later zeros
    load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), tmp_path / "hf")


@pytest.mark.parametrize("fmt", ["save_adapter", "save_pretrained"])
def test_another_base_is_refused_unless_check_base_is_false(tmp_path, fmt):
    model = randomize_adapters(add_elastic_lora(pruned_tiny(), TARGETS, ranks=[8, 4]), seed=1)
    (save_adapter if fmt == "save_adapter" else type(model).save_pretrained)(model, tmp_path)
    q = "model.layers.0.self_attn.q_proj"
    for other, what in ((make_tiny("llama"), "zeros"),  # the dense model
                        (pruned_tiny(seed=1), "checksum")):  # same names, shapes, sparsity
        before = state(other)
        with pytest.raises(ValueError, match=rf"{re.escape(q)}: .*{what}.*check_base=False"):
            load_adapter(other, tmp_path)
        assert same_state(other, before) and not list(elastic_modules(other))
    forced = load_adapter(make_tiny("llama"), tmp_path, check_base=False)
    assert len(list(elastic_modules(forced))) == 10
    ids = random_ids(1, 8)
    for dtype in (torch.bfloat16, torch.float16):  # the right base in another dtype passes
        again = load_adapter(pruned_tiny().to(dtype), tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(again(ids).logits.float(), model(ids).logits,
                                       rtol=0.05, atol=0.05)


def test_files_saved_before_the_fingerprint_still_load(tmp_path):
    model = randomize_adapters(add_elastic_lora(pruned_tiny(), TARGETS, ranks=[8, 4]), seed=1)
    save_adapter(model, tmp_path / "sa")
    model.save_pretrained(tmp_path / "hf")
    path = tmp_path / "sa" / CONFIG_NAME  # the old format: the same keys, no fingerprint
    old = {k: v for k, v in json.loads(path.read_text()).items() if k != "base_fingerprint"}
    path.write_text(json.dumps(old, indent=2))
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    del config["shears_super_adapter"]["base_fingerprint"]
    path.write_text(json.dumps(config, indent=2))
    ids = random_ids(1, 8)
    for d in ("sa", "hf"):
        loaded = load_adapter(pruned_tiny(), tmp_path / d)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)
        load_adapter(make_tiny("llama"), tmp_path / d)  # unchecked: nothing to check against
