"""quantize_base and the INT4 grid, against a hand-written per-group quantizer (plain loops)."""

import numpy as np
import pytest
import torch
from tiny import make_tiny, random_ids

import shears
from shears.pruning.layers import prunable_modules, weight_matrix
from shears.quantization import grid_of, quantized_modules


def hand_quantize(w: np.ndarray, bits: int, group: int):
    """Symmetric round-to-nearest, one scale per (row, group of `group` columns), by loops:
    s = max|w| / (2^(bits-1) - 1) (1 for an all-zero group), q = clip(round(w / s))."""
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    out, inp = w.shape
    q = np.zeros((out, inp), dtype=np.int64)
    s = np.zeros((out, inp // group), dtype=np.float32)
    for o in range(out):
        for g in range(inp // group):
            chunk = w[o, g * group:(g + 1) * group].astype(np.float32)
            m = np.abs(chunk).max()
            s[o, g] = np.float32(m / np.float32(qmax)) if m > 0 else 1.0
            q[o, g * group:(g + 1) * group] = np.clip(np.round(chunk / s[o, g]), qmin, qmax)
    return q, s


def hand_dequantize(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    group = q.shape[1] // s.shape[1]
    return (q * np.repeat(s, group, axis=1)).astype(np.float32)


def _maps(model):
    return {n: m for _, b in prunable_modules(model) for n, m in b.items()}


def _prune_half(model):
    shears.wanda_prune(model, method="magnitude", sparsity=0.5, progress=False)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 16)])
def test_quantize_base_matches_hand_quantizer(bits, group):
    model = make_tiny("llama")
    _prune_half(model)
    before = {n: weight_matrix(m).clone() for n, m in _maps(model).items()}
    report = shears.quantize_base(model, bits=bits, group_size=group)
    assert report.layers == list(before) and report.bits == bits
    for name, m in _maps(model).items():
        q, s = hand_quantize(before[name].numpy(), bits, group)
        np.testing.assert_array_equal(weight_matrix(m).numpy(), hand_dequantize(q, s))
        np.testing.assert_array_equal(grid_of(m).scale.numpy(), s)
        assert torch.all(weight_matrix(m)[before[name] == 0] == 0)  # every zero kept
    assert report.sparsity_before == pytest.approx(0.5)
    assert report.sparsity_after >= report.sparsity_before
    err = sum((before[n] - weight_matrix(m)).square().sum() for n, m in _maps(model).items())
    ref = sum(w.square().sum() for w in before.values())
    assert report.relative_error == pytest.approx(float((err / ref) ** 0.5), rel=1e-5)


def test_gpt2_conv1d_quantized_along_inputs():
    model = make_tiny("gpt2")
    before = {n: weight_matrix(m).clone() for n, m in _maps(model).items()}
    shears.quantize_base(model, group_size=32)
    for name, m in _maps(model).items():
        q, s = hand_quantize(before[name].numpy(), 4, 32)
        np.testing.assert_array_equal(weight_matrix(m).numpy(), hand_dequantize(q, s))


def test_quantized_model_stays_ordinary(tmp_path):
    model = make_tiny("llama")
    keys = set(model.state_dict())
    shears.quantize_base(model, group_size=32)
    assert all(type(m) is torch.nn.Linear for m in quantized_modules(model).values())
    # the stock keys, plus the scales of every map (which plain from_pretrained skips)
    assert set(model.state_dict()) == keys | {f"{n}.weight_scale" for n in _maps(model)}
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = random_ids()
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    # shears reads the grid back from the checkpoint (tests/test_grid_persist.py)
    shears.load_grid(again, tmp_path)
    for name, m in _maps(again).items():
        assert torch.equal(grid_of(m).scale, grid_of(model.get_submodule(name)).scale)


def _unchanged(model, fn):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as e:
        fn()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not quantized_modules(model)
    return str(e.value)


def test_refusals_change_nothing():
    model = make_tiny("llama")  # hidden 64, intermediate 128
    msg = _unchanged(model, lambda: shears.quantize_base(model, group_size=48))
    assert "in_features=64" in msg and "q_proj" in msg
    assert "bits" in _unchanged(model, lambda: shears.quantize_base(model, bits=3))
    assert "method" in _unchanged(model, lambda: shears.quantize_base(model, method="gptq"))
    shears.add_elastic_lora(model, ["q_proj"], ranks=[4])
    assert "adapters" in _unchanged(model, lambda: shears.quantize_base(model, group_size=32))


def test_refuses_a_model_already_quantized():
    model = make_tiny("llama")
    shears.quantize_base(model, group_size=32)
    with pytest.raises(ValueError, match="already quantized"):
        shears.quantize_base(model, group_size=32)
    other = make_tiny("llama")
    other.config.quantization_config = {"quant_method": "compressed-tensors"}
    with pytest.raises(ValueError, match="already quantized"):
        shears.quantize_base(other, group_size=32)


def test_refuses_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    model = make_tiny("llama")
    lin = model.model.layers[0].mlp.up_proj
    model.model.layers[0].mlp.up_proj = bnb.nn.Linear8bitLt(
        lin.in_features, lin.out_features, bias=False, has_fp16_weights=True)
    with pytest.raises(ValueError, match="bitsandbytes"):
        shears.quantize_base(model, group_size=32)
