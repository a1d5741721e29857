"""ElasticLoRALinear and add_elastic_lora against independent computations."""

import copy
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import make_tiny, random_ids, randomize_adapters
from torch import nn
from transformers.pytorch_utils import Conv1D

from shears.adapters import (
    ElasticLoRALinear,
    add_elastic_lora,
    elastic_modules,
    maximal_config,
    set_config,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_equals_formula_at_every_rank(kind):
    torch.manual_seed(0)
    base = nn.Linear(24, 20) if kind == "linear" else Conv1D(20, 24)  # Conv1D(nf=out, nx=in)
    layer = ElasticLoRALinear(base, ranks=[4, 12, 8], alpha=16.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 24)
    w = base.weight if kind == "linear" else base.weight.T  # (out, in)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    assert layer.ranks == (12, 8, 4) and layer.active_rank == 12
    for r in (12, 8, 4):
        layer.active_rank = r
        expected = x @ w.T + base.bias + (16.0 / 12) * (x @ a[:r].T @ b[:, :r].T)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        delta = (16.0 / 12) * b[:, :r] @ a[:r]
        torch.testing.assert_close(layer.delta_weight(), delta)
        torch.testing.assert_close(layer(x), x @ (w + delta).T + base.bias, rtol=1e-4, atol=1e-4)


def test_init_dtype_device_and_freezing():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = ElasticLoRALinear(base, ranks=(4, 2))
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    assert layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (8, 4)
    assert torch.all(layer.lora_B == 0) and layer.lora_A.abs().sum() > 0
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    out = layer(torch.randn(2, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_rank_validation_and_setter():
    with pytest.raises(ValueError, match="exceeds"):
        ElasticLoRALinear(nn.Linear(16, 8), ranks=(16, 4))
    for bad in ((4, 4), (0, 2), (), (2.0,)):
        with pytest.raises(ValueError):
            ElasticLoRALinear(nn.Linear(16, 8), ranks=bad)
    layer = ElasticLoRALinear(nn.Linear(16, 8), ranks=(4, 2))
    with pytest.raises(ValueError, match="3"):
        layer.active_rank = 3
    with pytest.raises(TypeError):
        ElasticLoRALinear(nn.Embedding(4, 4))


def test_sparse_adapter_keeps_base_zeros():
    torch.manual_seed(0)
    base = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        base.weight[torch.rand_like(base.weight) < 0.5] = 0
    layer = ElasticLoRALinear(base, ranks=(8, 4), sparse_adapter=True)
    with torch.no_grad():
        layer.lora_B.normal_()
    mask = base.weight != 0
    merged = base.weight + layer.delta_weight(4)
    assert torch.all(merged[~mask] == 0)
    layer.active_rank = 4
    x = torch.randn(6, 32)
    a, b = layer.lora_A.detach()[:4], layer.lora_B.detach()[:, :4]
    expected = x @ (base.weight + (64.0 / 8) * (b @ a) * mask).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_matches_peft_at_r_max(family):
    targets = TARGETS if family == "llama" else ["c_attn", "c_fc", "c_proj"]
    ref = make_tiny(family)
    ours = add_elastic_lora(copy.deepcopy(ref), targets, ranks=[16, 8, 4], alpha=32)
    randomize_adapters(ours, a_scale=0.1)
    peft = get_peft_model(ref, LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                          fan_in_fan_out=family == "gpt2"))
    n = 0
    for name, m in elastic_modules(ours):
        p = peft.base_model.model.get_submodule(name)
        with torch.no_grad():
            p.lora_A["default"].weight.copy_(m.lora_A)
            p.lora_B["default"].weight.copy_(m.lora_B)
        n += 1
    assert n == (10 if family == "llama" else 8)  # gpt2: attn and mlp c_proj
    ids = random_ids(2, 16)
    with torch.no_grad():
        diff = (ours(ids).logits - peft(ids).logits).abs().max().item()
        base = (ours(ids).logits - make_tiny(family)(ids).logits).abs().max().item()
    assert diff <= 1e-5
    assert base > 1e-2  # the adapters do change the output


def test_add_elastic_lora_freezes_and_wraps():
    model = add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[8, 4])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 20 and all(re.search(r"lora_[AB]$", n) for n in trainable)
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, nn.Linear)
    assert not isinstance(model.model.layers[0].self_attn.o_proj, ElasticLoRALinear)
    assert maximal_config(model) == {n: 8 for n, _ in elastic_modules(model)}


def test_regex_targets_and_errors():
    model = add_elastic_lora(make_tiny("llama"), r"model\.layers\.1\.mlp\..*", ranks=[4])
    assert [n for n, _ in elastic_modules(model)] == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="already applied"):
        add_elastic_lora(model, ["q_proj"])
    with pytest.raises(ValueError, match="q_proj"):  # lists the candidate names
        add_elastic_lora(make_tiny("llama"), ["query"])
    fresh = make_tiny("llama")
    with pytest.raises(ValueError, match="exceeds"):
        add_elastic_lora(fresh, TARGETS, ranks=[64, 128])
    assert not any(isinstance(m, ElasticLoRALinear) for m in fresh.modules())  # untouched
    with pytest.raises(ValueError, match="groups"):
        add_elastic_lora(make_tiny("llama"), TARGETS, groups="block")


def test_set_config_changes_logits_and_rank_slices_share_weights():
    model = add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[16, 8, 4])
    randomize_adapters(model, a_scale=0.1)
    ids = random_ids(1, 8)
    with torch.no_grad():
        full = model(ids).logits
        set_config(model, {n: 4 for n, _ in elastic_modules(model)})
        small = model(ids).logits
        # The rank-4 sub-adapter equals a super-adapter whose columns/rows past 4 are zero.
        for _, m in elastic_modules(model):
            m.lora_B[:, 4:] = 0
        set_config(model, maximal_config(model))
        zeroed = model(ids).logits
    assert (full - small).abs().max() > 1e-3
    torch.testing.assert_close(small, zeroed, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_smollm2_matches_peft_at_r_max_and_heuristic_slice():
    from smollm2 import load_smollm2

    from shears.adapters import heuristic_config

    ref, _ = load_smollm2()
    ours = add_elastic_lora(copy.deepcopy(ref), TARGETS, ranks=[32, 24, 16], alpha=64)
    randomize_adapters(ours, a_scale=0.1)
    peft = get_peft_model(ref, LoraConfig(r=32, lora_alpha=64, target_modules=TARGETS))
    for name, m in elastic_modules(ours):
        p = peft.base_model.model.get_submodule(name)
        with torch.no_grad():
            p.lora_A["default"].weight.copy_(m.lora_A)
            p.lora_B["default"].weight.copy_(m.lora_B)
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids).logits - peft(ids).logits).abs().max() <= 1e-4
        # The heuristic sub-adapter (rank 24) equals PEFT with columns 24.. of B zeroed.
        set_config(ours, heuristic_config(ours))
        for name, _ in elastic_modules(ours):
            peft.base_model.model.get_submodule(name).lora_B["default"].weight[:, 24:] = 0
        assert (ours(ids).logits - peft(ids).logits).abs().max() <= 1e-4
