"""The adapter index: group -> modules resolved once, reused by every switch, never stale.

The reference in these tests is an independent walk of the module tree
(``named_modules``), written here, never the index itself.
"""

import copy
import gc
import pickle
import re
import weakref

import pytest
from tiny import make_tiny
from torch import nn

from shears.adapters import (
    ElasticLoRALinear,
    add_elastic_lora,
    elastic_index,
    get_config,
    maximal_config,
    minimal_config,
    random_config,
    search_space,
    set_config,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def paper_groups(name: str) -> str:
    return re.sub(r"[qkv]_proj$", "qkv_proj", name)


@pytest.fixture
def model():
    return add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[16, 8, 4], groups=paper_groups)


def walked_ranks(model: nn.Module) -> dict[str, int]:
    """Qualified name -> active rank, by walking the tree (the independent reference)."""
    return {n: m.active_rank for n, m in model.named_modules() if isinstance(m, ElasticLoRALinear)}


def walked_groups(model: nn.Module) -> list[str]:
    """Group keys in module order, by walking the tree."""
    keys = [m.group for _, m in model.named_modules() if isinstance(m, ElasticLoRALinear)]
    return list(dict.fromkeys(keys))


def unwrap(model: nn.Module, name: str) -> None:
    """Put an adapter's base layer back in its place (what a merge does)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, model.get_submodule(name).base_layer)


def test_switches_do_not_walk_the_model(model, monkeypatch):
    space = search_space(model)  # the one walk
    walks = []
    original = nn.Module.named_modules
    monkeypatch.setattr(nn.Module, "named_modules",
                        lambda self, *a, **k: (walks.append(1), original(self, *a, **k))[1])
    for seed in range(5):
        cfg = random_config(model, seed)
        set_config(model, cfg)
        assert get_config(model) == cfg
        assert search_space(model) == space
    monkeypatch.undo()
    assert walks == []
    assert walked_ranks(model) == {
        n: cfg[paper_groups(n)] for n in walked_ranks(model)}  # the last switch, module by module


def test_index_set_returns_the_complete_config_in_space_order(model):
    index = elastic_index(model)
    assert elastic_index(model) is index  # cached
    groups = list(index.space)
    assert groups == walked_groups(model)
    partial = {groups[3]: 4, groups[0]: 8}  # out of order, partial
    done = index.set(partial)
    assert list(done) == groups and done == {**maximal_config(model), **partial}
    assert index.set(dict(reversed(list(done.items())))) == done  # order follows the space
    assert list(index.set(done)) == groups


def test_merge_like_replacement_invalidates(model):
    set_config(model, minimal_config(model))
    names = list(walked_ranks(model))
    unwrap(model, names[0])  # Q of block 0 gone: its group keeps K and V
    assert list(get_config(model)) == walked_groups(model)
    set_config(model, {"model.layers.0.self_attn.qkv_proj": 8})
    assert walked_ranks(model)["model.layers.0.self_attn.k_proj"] == 8
    assert len(walked_ranks(model)) == len(names) - 1
    for name in names[1:]:  # all gone, as after merge_adapters
        unwrap(model, name)
    for fn in (get_config, search_space, lambda m: set_config(m, {})):
        with pytest.raises(ValueError, match="add_elastic_lora"):
            fn(model)
    add_elastic_lora(model, ["up_proj"], ranks=[8, 2])  # and back, differently
    assert search_space(model) == {f"model.layers.{i}.mlp.up_proj": [8, 2] for i in range(2)}


def test_group_disappears_with_its_last_adapter(model):
    search_space(model)
    unwrap(model, "model.layers.1.mlp.down_proj")
    assert "model.layers.1.mlp.down_proj" not in search_space(model)
    with pytest.raises(KeyError, match="model.layers.1.mlp.down_proj"):
        set_config(model, {"model.layers.1.mlp.down_proj": 4})
    assert list(search_space(model)) == walked_groups(model)


def test_deleted_block_invalidates(model):
    search_space(model)
    del model.model.layers[0]  # ModuleList re-indexes without any registration hook
    assert list(search_space(model)) == walked_groups(model)
    assert all(g.startswith("model.layers.1.") for g in search_space(model))
    set_config(model, minimal_config(model))
    assert set(walked_ranks(model).values()) == {4}


def test_adapter_added_by_hand_is_seen(model):
    search_space(model)
    model.lm_head = ElasticLoRALinear(model.lm_head, ranks=[8, 4])  # outside any cached path
    assert "lm_head" in search_space(model)
    set_config(model, {"lm_head": 4})
    assert walked_ranks(model)["lm_head"] == 4


def test_deepcopy_has_its_own_adapters(model):
    set_config(model, maximal_config(model))
    clone = copy.deepcopy(model)
    set_config(clone, minimal_config(clone))
    assert set(walked_ranks(model).values()) == {16}
    assert set(walked_ranks(clone).values()) == {4}
    assert get_config(model) == maximal_config(model)
    assert get_config(clone) == minimal_config(clone)


def test_pickled_model_rebuilds_its_index(model):
    set_config(model, minimal_config(model))
    clone = pickle.loads(pickle.dumps(model))  # what torch.save(model) does
    assert get_config(clone) == minimal_config(model)
    set_config(clone, maximal_config(clone))
    assert set(walked_ranks(clone).values()) == {16}
    assert set(walked_ranks(model).values()) == {4}


def test_index_does_not_keep_the_model_alive():
    model = add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[8, 4])
    # A hook that refers to the model, on a module the index holds: the cycle is collectable.
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_, m=model: get_config(m))
    set_config(model, minimal_config(model))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_rank_set_directly_on_modules_is_read_back(model):
    search_space(model)
    for name in walked_ranks(model):
        if name.startswith("model.layers.0.self_attn."):
            model.get_submodule(name).active_rank = 8  # bypassing set_config
    assert get_config(model)["model.layers.0.self_attn.qkv_proj"] == 8
    model.model.layers[0].self_attn.q_proj.active_rank = 4
    with pytest.raises(ValueError, match="disagree"):
        get_config(model)


def test_mixed_rank_lists_in_one_group_are_refused():
    net = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    net[0] = ElasticLoRALinear(net[0], ranks=[8, 4], group="g")
    net[1] = ElasticLoRALinear(net[1], ranks=[8, 2], group="g")
    with pytest.raises(ValueError, match="mixes rank lists"):
        set_config(net, {"g": 8})
    net[1] = ElasticLoRALinear(net[1].base_layer, ranks=[4, 8], group="g")
    set_config(net, {"g": 4})
    assert [m.active_rank for m in net] == [4, 4]
