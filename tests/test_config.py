"""Configurations and search spaces of elastic super-adapters."""

import json
import re

import numpy as np
import pytest
from tiny import make_tiny

from shears.adapters import (
    adapter_parameters,
    add_elastic_lora,
    get_config,
    heuristic_config,
    maximal_config,
    minimal_config,
    random_config,
    search_space,
    set_config,
)
from shears.adapters.inject import group_function

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def paper_groups(name: str) -> str:
    return re.sub(r"[qkv]_proj$", "qkv_proj", name)


@pytest.fixture
def model():
    return add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[8, 16, 4], alpha=32)


def test_search_space_per_module_descending(model):
    space = search_space(model)
    expected = [f"model.layers.{i}.{p}" for i in range(2) for p in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "mlp.up_proj", "mlp.down_proj")]
    assert list(space) == expected
    assert all(ranks == [16, 8, 4] for ranks in space.values())


def test_paper_grouping_and_layer_grouping():
    m = add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[16, 8], groups=paper_groups)
    assert list(search_space(m)) == [
        "model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.qkv_proj",
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    named = add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[16, 8], groups="qkv")
    assert search_space(named) == search_space(m)  # the built-in name of the paper's grouping
    fn = group_function("qkv")
    assert fn("model.layers.3.self_attn.k_proj") == "model.layers.3.self_attn.qkv_proj"
    assert fn("k_proj") == "qkv_proj"
    assert fn("model.layers.3.attn.xq_proj") == "model.layers.3.attn.xq_proj"  # not a Q/K/V
    assert fn("model.layers.3.mlp.down_proj") == "model.layers.3.mlp.down_proj"
    up = "model.layers.3.mlp.up_proj"
    assert group_function("qkv", [up])(up) == up  # no gate adapted: alone, as before
    m = add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[16, 8], groups="layer")
    assert list(search_space(m)) == ["model.layers.0", "model.layers.1"]
    set_config(m, {"model.layers.1": 8})
    ranks = {n: mod.active_rank for n, mod in m.named_modules() if hasattr(mod, "active_rank")}
    assert all(r == (8 if n.startswith("model.layers.1.") else 16) for n, r in ranks.items())
    assert len(ranks) == 10


def test_named_configs(model):
    space = search_space(model)
    assert set(maximal_config(model).values()) == {16}
    assert set(minimal_config(space).values()) == {4}
    assert set(heuristic_config(model).values()) == {8}
    assert heuristic_config({"a": [32, 24, 16]}) == {"a": 24}
    assert heuristic_config({"a": [32, 24, 16, 8]}) == {"a": 24}  # ranks[(n - 1) // 2]
    assert heuristic_config({"a": [16, 32]}) == {"a": 32}
    assert maximal_config({"a": [4, 12, 8]}) == {"a": 12}


def test_search_space_dict_is_validated_copy():
    src = {"a": [4, 8], "b": [np.int64(3)]}
    out = search_space(src)
    assert out == {"a": [8, 4], "b": [3]} and type(out["b"][0]) is int
    out["a"].append(1)
    assert src["a"] == [4, 8]
    for bad in ({"a": []}, {"a": [4, 4]}, {"a": [0]}, {"a": [2.5]}, {"a": 4}, {1: [4]}, {}):
        with pytest.raises((ValueError, TypeError)):
            search_space(bad)


def test_set_get_roundtrip_json_and_partial(model):
    cfg = random_config(model, 3)
    set_config(model, json.loads(json.dumps(cfg)))
    assert get_config(model) == cfg
    first = next(iter(cfg))
    other = 16 if cfg[first] != 16 else 4
    set_config(model, {first: other})
    assert get_config(model) == {**cfg, first: other}


def test_set_config_errors_name_the_culprit(model):
    before = get_config(model)
    with pytest.raises(KeyError, match="nope"):
        set_config(model, {"nope": 8})
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj"):
        set_config(model, {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.mlp.up_proj": 5})
    assert get_config(model) == before  # validated before anything changed


def test_random_config_seeded_and_uniform(model):
    space = search_space(model)
    a = random_config(space, np.random.default_rng(7))
    assert a == random_config(model, 7)
    rng = np.random.default_rng(0)
    counts = {32: 0, 24: 0, 16: 0}
    for _ in range(3000):
        counts[random_config({"g": [32, 24, 16]}, rng)["g"]] += 1
    assert all(900 < c < 1100 for c in counts.values()), counts
    assert len({tuple(random_config(space, s).values()) for s in range(10)}) > 1


def test_adapter_parameters_formula(model):
    # llama tiny: hidden 64, intermediate 128, 4 heads, 2 kv heads -> head_dim 16.
    shapes = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32),
              "up_proj": (64, 128), "down_proj": (128, 64)}  # (in, out)
    per_rank = 2 * sum(i + o for i, o in shapes.values())
    assert adapter_parameters(model) == 16 * per_rank  # starts at r_max
    assert adapter_parameters(model, minimal_config(model)) == 4 * per_rank
    cfg = {"model.layers.1.mlp.down_proj": 8}
    assert adapter_parameters(model, cfg) == 16 * per_rank - 8 * (128 + 64)
    assert get_config(model) == maximal_config(model)  # counting does not activate
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapter_parameters(model, maximal_config(model)) == trainable


def test_no_adapters_is_a_clear_error():
    with pytest.raises(ValueError, match="add_elastic_lora"):
        search_space(make_tiny("llama"))


def groups_of(model) -> dict[str, list[str]]:
    """Group key -> the adapted modules' qualified names, read off the modules."""
    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if hasattr(module, "active_rank"):
            out.setdefault(module.group, []).append(name)
    return out


def test_qkv_ties_up_and_gate_when_both_are_adapted():
    """The authors' nncf_shears_llama_with_gate_proj.json: [q, k, v], [up, gate], [down]."""
    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    m = add_elastic_lora(make_tiny("llama"), targets, ranks=[16, 8], groups="qkv")
    expected = {}
    for i in range(2):
        b = f"model.layers.{i}"
        expected[f"{b}.self_attn.qkv_proj"] = [f"{b}.self_attn.{p}_proj" for p in "qkv"]
        expected[f"{b}.mlp.gate_up_proj"] = [f"{b}.mlp.gate_proj", f"{b}.mlp.up_proj"]
        expected[f"{b}.mlp.down_proj"] = [f"{b}.mlp.down_proj"]
    assert groups_of(m) == expected
    assert list(search_space(m)) == list(expected)  # 3 groups per block, in module order
    set_config(m, {"model.layers.1.mlp.gate_up_proj": 8})
    mlp = m.model.layers[1].mlp
    assert (mlp.gate_proj.active_rank, mlp.up_proj.active_rank) == (8, 8)
    assert mlp.down_proj.active_rank == 16


def test_qkv_leaves_up_or_gate_alone_without_its_partner():
    for alone in ("up_proj", "gate_proj"):
        m = add_elastic_lora(make_tiny("llama"), ["q_proj", "v_proj", alone, "down_proj"],
                             ranks=[16, 8], groups="qkv")
        expected = {}
        for i in range(2):
            b = f"model.layers.{i}"
            expected[f"{b}.self_attn.qkv_proj"] = [f"{b}.self_attn.q_proj",
                                                   f"{b}.self_attn.v_proj"]
            expected[f"{b}.mlp.{alone}"] = [f"{b}.mlp.{alone}"]
            expected[f"{b}.mlp.down_proj"] = [f"{b}.mlp.down_proj"]
        assert groups_of(m) == expected, alone
    # Only block 0's gate is adapted next to every up: block 0 ties them, block 1 does not.
    m = add_elastic_lora(make_tiny("llama"), r"model\.layers\.(0\.mlp\.gate|\d\.mlp\.up)_proj",
                         ranks=[16, 8], groups="qkv")
    assert groups_of(m) == {
        "model.layers.0.mlp.gate_up_proj": ["model.layers.0.mlp.gate_proj",
                                            "model.layers.0.mlp.up_proj"],
        "model.layers.1.mlp.up_proj": ["model.layers.1.mlp.up_proj"]}
    fn = group_function("qkv", ["model.layers.3.mlp.up_proj", "model.layers.3.mlp.gate_proj"])
    assert fn("model.layers.3.mlp.gate_proj") == "model.layers.3.mlp.gate_up_proj"
    assert fn("model.layers.4.mlp.gate_proj") == "model.layers.4.mlp.gate_proj"  # no partner
    assert fn("model.layers.3.mlp.xup_proj") == "model.layers.3.mlp.xup_proj"
