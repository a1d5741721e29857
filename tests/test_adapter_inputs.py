"""Bad adapter arguments are refused before anything changes; ranks arrays; adapter dtype."""

import math

import numpy as np
import pytest
import torch
from tiny import make_tiny, random_ids
from torch import nn

from shears.adapters import (
    ElasticLoRALinear,
    add_elastic_lora,
    elastic_modules,
    search_space,
    set_config,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
BAD_ALPHA_DROPOUT = [
    (dict(alpha=0), r"alpha must be a finite number > 0, got 0"),
    (dict(alpha=-16.0), r"alpha must be a finite number > 0, got -16\.0"),
    (dict(alpha=math.nan), r"alpha must be a finite number > 0, got nan"),
    (dict(alpha=math.inf), r"alpha must be a finite number > 0, got inf"),
    (dict(alpha=-math.inf), r"alpha must be a finite number > 0, got -inf"),
    (dict(dropout=-0.1), r"dropout must be a probability in \[0, 1\), got -0\.1"),
    (dict(dropout=1.0), r"dropout must be a probability in \[0, 1\), got 1\.0"),
    (dict(dropout=1.5), r"dropout must be a probability in \[0, 1\), got 1\.5"),
    (dict(dropout=math.nan), r"dropout must be a probability in \[0, 1\), got nan"),
]


def snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def assert_untouched(model, before):
    assert not any(isinstance(m, ElasticLoRALinear) for m in model.modules())
    now = snapshot(model)
    assert now.keys() == before.keys()
    for n, (p, grad) in now.items():
        assert torch.equal(p, before[n][0]) and grad == before[n][1], n
    assert "shears_super_adapter" not in model.config.to_dict()
    assert not hasattr(model, "_shears_requires_grad")


@pytest.mark.parametrize("kwargs,message", BAD_ALPHA_DROPOUT)
def test_add_elastic_lora_refuses_bad_alpha_or_dropout_and_changes_nothing(kwargs, message):
    model = make_tiny("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        add_elastic_lora(model, TARGETS, ranks=[8, 4], **kwargs)
    assert_untouched(model, before)


@pytest.mark.parametrize("kwargs,message", BAD_ALPHA_DROPOUT)
def test_layer_refuses_bad_alpha_or_dropout_before_freezing_the_base(kwargs, message):
    base = nn.Linear(16, 8)
    with pytest.raises(ValueError, match=message):
        ElasticLoRALinear(base, ranks=(4, 2), **kwargs)
    assert all(p.requires_grad for p in base.parameters())  # the base was not frozen


@pytest.mark.parametrize("kwargs", [dict(alpha="64"), dict(alpha=True), dict(dropout="0.1"),
                                    dict(dropout=None), dict(alpha=torch.tensor(8.0))])
def test_alpha_and_dropout_must_be_real_numbers(kwargs):
    (name, value), = kwargs.items()
    with pytest.raises(TypeError, match=f"{name} must be a real number"):
        ElasticLoRALinear(nn.Linear(16, 8), ranks=(4, 2), **kwargs)


def test_valid_alpha_and_dropout_still_accepted():
    # the edges: any positive finite alpha, dropout 0 (no dropout) and just below 1
    for alpha, dropout in ((1e-3, 0.0), (np.float32(16), 0.999), (32, 0)):
        layer = ElasticLoRALinear(nn.Linear(16, 8), ranks=(4, 2), alpha=alpha, dropout=dropout)
        assert layer.scaling == float(alpha) / 4 and layer.dropout_p == float(dropout)


# --- ranks as numpy arrays / numpy ints: accepted everywhere, stored as plain ints -------

@pytest.mark.parametrize("ranks", [np.array([8, 4, 2]), [np.int64(8), np.int32(4), 2],
                                   (np.uint8(2), np.int16(8), np.int64(4))])
def test_numpy_ranks_are_accepted_and_stored_as_plain_ints(ranks):
    model = add_elastic_lora(make_tiny("llama"), TARGETS, ranks=ranks)
    for _, m in elastic_modules(model):
        assert m.ranks == (8, 4, 2) and all(type(r) is int for r in m.ranks)
        assert type(m.r_max) is int and m.scaling == 64.0 / 8
    meta = model.config.to_dict()["shears_super_adapter"]
    assert meta["ranks"] == [8, 4, 2] and all(type(r) is int for r in meta["ranks"])
    model.config.to_json_string()  # numpy ints would make this raise
    layer = ElasticLoRALinear(nn.Linear(16, 8), ranks=ranks)
    assert layer.ranks == (8, 4, 2) and all(type(r) is int for r in layer.ranks)
    # the search-space check agrees
    assert search_space({"g": ranks}) == {"g": [8, 4, 2]}


@pytest.mark.parametrize("ranks", [[16.0, 8.0], np.array([8.0, 4.0]), [8, True], ["8"],
                                   [8, 4.5], np.array([[8, 4]])])
def test_non_integral_ranks_are_refused_everywhere(ranks):
    model = make_tiny("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="ranks must be positive ints"):
        add_elastic_lora(model, TARGETS, ranks=ranks)
    assert_untouched(model, before)
    with pytest.raises(ValueError, match="ranks must be positive ints"):
        ElasticLoRALinear(nn.Linear(16, 8), ranks=ranks)
    with pytest.raises(ValueError, match="rank"):
        search_space({"g": ranks})


@pytest.mark.parametrize("ranks", [8, np.int64(8), "8", iter([8, 4]), []])
def test_ranks_must_be_a_non_empty_sequence(ranks):
    with pytest.raises(ValueError, match="non-empty list of positive ints"):
        add_elastic_lora(make_tiny("llama"), TARGETS, ranks=ranks)


# --- dtype: created fp32; a later .to(dtype) casts them (as PEFT and torch do) ------------

def test_adapters_are_created_fp32_even_under_another_default_dtype():
    model = make_tiny("llama", dtype=torch.bfloat16)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        add_elastic_lora(model, TARGETS, ranks=[8, 4])
    finally:
        torch.set_default_dtype(old)
    for _, m in elastic_modules(model):
        assert m.lora_A.dtype == m.lora_B.dtype == torch.float32
        assert m.base_layer.weight.dtype == torch.bfloat16


def test_to_dtype_casts_adapters_and_bf16_forward_backward_work():
    torch.manual_seed(0)
    model = add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[8, 4], alpha=16)
    with torch.no_grad():
        for _, m in elastic_modules(model):
            m.lora_B.normal_(std=0.1)
    ids = random_ids(2, 16)
    with torch.no_grad():
        ref = model(ids).logits  # fp32 throughout
    model.to(torch.bfloat16)
    for _, m in elastic_modules(model):
        assert m.lora_A.dtype == m.lora_B.dtype == torch.bfloat16  # torch's .to(dtype)
        assert m.lora_A.requires_grad and m.lora_B.requires_grad
    set_config(model, {g: 4 for g in search_space(model)})
    set_config(model, {g: 8 for g in search_space(model)})
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    # the same function in bf16: within bf16 rounding of the fp32 logits
    torch.testing.assert_close(out.logits.float(), ref, rtol=0.05, atol=0.1)
    out.loss.backward()
    for _, m in elastic_modules(model):
        assert m.lora_A.grad.dtype == torch.bfloat16 and torch.isfinite(m.lora_A.grad).all()
        assert m.lora_B.grad.abs().sum() > 0
    model.to(torch.float32)  # and back: the adapters follow again
    assert all(m.lora_A.dtype == torch.float32 for _, m in elastic_modules(model))


def test_layer_refuses_bad_ranks_before_freezing_the_base():
    base = nn.Linear(16, 8)
    for ranks in ((16, 4), (4, 4), (4.0,)):
        with pytest.raises(ValueError):
            ElasticLoRALinear(base, ranks=ranks)
        assert all(p.requires_grad for p in base.parameters())


def test_dtype_behaviour_is_peft_s():
    # PEFT (autocast_adapter_dtype=True) creates LoRA weights in fp32 over a bf16 base, and
    # a later .to(dtype) casts them like any parameter: ours do the same at both steps.
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(make_tiny("llama", dtype=torch.bfloat16),
                          LoraConfig(r=4, target_modules=["q_proj"]))
    ours = add_elastic_lora(make_tiny("llama", dtype=torch.bfloat16), ["q_proj"], ranks=[4])
    p = peft.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    q = ours.model.layers[0].self_attn.q_proj.lora_A
    assert p.dtype == q.dtype == torch.float32
    peft.to(torch.bfloat16)
    ours.to(torch.bfloat16)
    p = peft.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    q = ours.model.layers[0].self_attn.q_proj.lora_A
    assert p.dtype == q.dtype == torch.bfloat16
