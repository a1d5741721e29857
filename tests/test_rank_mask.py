"""rank_mode="mask": the same maths as prefix slicing, with static shapes and an in-place mask."""

import copy
import json

import pytest
import torch
from tiny import make_tiny, random_ids, randomize_adapters
from torch import nn
from transformers.pytorch_utils import Conv1D

from shears.adapters import (
    ElasticLoRALinear,
    add_elastic_lora,
    elastic_modules,
    get_config,
    random_config,
    set_config,
)
from shears.export import CONFIG_NAME, load_adapter, save_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def layer_pair(kind, sparse, seed=0):
    """The same adapter twice, once per rank_mode, with random (visible) weights."""
    torch.manual_seed(seed)
    base = nn.Linear(24, 20) if kind == "linear" else Conv1D(20, 24)  # Conv1D(nf=out, nx=in)
    if sparse:
        with torch.no_grad():
            base.weight[torch.rand_like(base.weight) < 0.5] = 0
    sliced = ElasticLoRALinear(base, ranks=[12, 8, 4], alpha=16.0, sparse_adapter=sparse)
    with torch.no_grad():
        sliced.lora_B.normal_()
    masked = copy.deepcopy(sliced)
    masked.rank_mode = "mask"
    return sliced, masked


def reference(layer, x, r):
    """Hand-written forward on leaf copies of A and B, sliced; returns (y, dA, dB) for a
    fixed random cotangent: an autograd computation independent of ElasticLoRALinear."""
    w = layer.base_weight().detach()
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    delta = (16.0 / 12) * b[:, :r] @ a[:r]
    if layer.sparse_adapter:
        delta = delta * (w != 0)
    y = x @ (w + delta).T + layer.base_layer.bias
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), a.grad, b.grad


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("sparse", [False, True])
def test_mask_equals_slice_forward_and_gradients(kind, sparse):
    sliced, masked = layer_pair(kind, sparse)
    x = torch.randn(3, 5, 24)
    for r in (12, 8, 4):
        y_ref, da_ref, db_ref = reference(sliced, x, r)
        for layer in (sliced, masked):
            layer.active_rank = r
            layer.zero_grad()
            y = layer(x)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.lora_A.grad, da_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.lora_B.grad, db_ref, rtol=1e-5, atol=1e-5)
            # Inactive rows of A and columns of B: exactly zero, in both modes.
            assert torch.all(layer.lora_A.grad[r:] == 0)
            assert torch.all(layer.lora_B.grad[:, r:] == 0)
        torch.testing.assert_close(masked.delta_weight(), sliced.delta_weight(), rtol=0, atol=0)


def test_mask_is_a_non_persistent_device_buffer_rewritten_in_place():
    sliced, masked = layer_pair("linear", False)
    assert "rank_mask" not in dict(sliced.named_buffers())
    mask = masked.rank_mask
    assert mask.dtype == torch.bool and mask.shape == (12,) and mask.device == masked.lora_A.device
    ptr = mask.data_ptr()
    for r in (4, 8, 12, 4):
        masked.active_rank = r
        assert masked.rank_mask.data_ptr() == ptr  # written in place: no new tensor
        assert masked.rank_mask.tolist() == [i < r for i in range(12)]
    assert masked.state_dict().keys() == sliced.state_dict().keys()  # state dicts unchanged
    masked.to(torch.bfloat16)
    assert masked.rank_mask.dtype == torch.bool and masked.lora_A.dtype == torch.bfloat16
    masked.rank_mode = "slice"
    assert "rank_mask" not in dict(masked.named_buffers())
    masked.active_rank = 8
    masked.rank_mode = "mask"  # a new mask follows the current rank
    assert masked.rank_mask.tolist() == [i < 8 for i in range(12)]
    assert "rank_mode='mask'" in repr(masked)


def test_mask_is_rewritten_after_to_empty():
    """Meta-device initialisation (FSDP2, ``to_empty``) leaves buffers uninitialised; the
    non-persistent mask is not in any state dict to load, so the layer rewrites it."""
    _, masked = layer_pair("linear", False)
    masked.active_rank = 8
    with torch.no_grad():
        masked.rank_mask.fill_(True)  # what garbage memory could hold
    masked.to_empty(device="cpu")
    assert masked.rank_mask.tolist() == [i < 8 for i in range(12)]


def test_rank_mode_errors_change_nothing():
    with pytest.raises(ValueError, match="rank_mode"):
        ElasticLoRALinear(nn.Linear(16, 8), ranks=(4, 2), rank_mode="masked")
    layer = ElasticLoRALinear(nn.Linear(16, 8), ranks=(4, 2))
    with pytest.raises(ValueError, match="rank_mode"):
        layer.rank_mode = "dynamic"
    assert layer.rank_mode == "slice"
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="rank_mode"):
        add_elastic_lora(model, TARGETS, rank_mode="Mask")
    assert not any(isinstance(m, ElasticLoRALinear) for m in model.modules())


def test_model_in_mask_mode_matches_slice_mode_at_every_config():
    sliced = add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[16, 8, 4])
    randomize_adapters(sliced, seed=0, a_scale=None)
    masked = copy.deepcopy(sliced)
    for _, m in elastic_modules(masked):
        m.rank_mode = "mask"
    ids = random_ids(2, 12)
    for seed in range(4):
        cfg = random_config(sliced, seed)
        set_config(sliced, cfg)
        set_config(masked, cfg)
        assert get_config(masked) == cfg
        with torch.no_grad():
            torch.testing.assert_close(masked(ids).logits, sliced(ids).logits,
                                       rtol=1e-5, atol=1e-5)


def test_save_load_records_rank_mode_and_reads_old_files(tmp_path):
    model = add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[8, 4], rank_mode="mask")
    set_config(model, random_config(model, 1))
    save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["rank_mode"] == "mask"
    loaded = load_adapter(make_tiny("llama"), tmp_path)
    assert {m.rank_mode for _, m in elastic_modules(loaded)} == {"mask"}
    assert get_config(loaded) == get_config(model)
    for _, m in elastic_modules(loaded):  # the masks follow the loaded configuration
        assert m.rank_mask.tolist() == [i < m.active_rank for i in range(8)]
    sliced = add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[8, 4])
    load_adapter(sliced, tmp_path)  # an adapted model keeps its own mode: same maths
    assert {m.rank_mode for _, m in elastic_modules(sliced)} == {"slice"}
    del meta["rank_mode"]  # a file written before rank_mode existed
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    old = load_adapter(make_tiny("llama"), tmp_path)
    assert {m.rank_mode for _, m in elastic_modules(old)} == {"slice"}
    ids = random_ids(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(old(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
