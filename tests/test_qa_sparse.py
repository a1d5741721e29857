"""QA-SparsePEFT: sparse adapters trained on the base's INT4 grid, and their exact merge.

References: a hand-written fake quantizer on the recorded scales (numpy loops-free but
independent of shears.quantization), the straight-through gradient as its definition (the
gradient of the same function without the rounding), and the adapted model's own logits.
"""

import warnings

import numpy as np
import pytest
import torch
from tiny import make_tiny, random_ids, randomize_adapters

import shears
from shears.adapters import elastic_modules
from shears.pruning.layers import weight_matrix
from shears.quantization import grid_of, quantized_modules

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]


def hand_fake_quant(v: np.ndarray, s: np.ndarray, bits: int = 4) -> np.ndarray:
    """Nearest point of the symmetric grid q * s, q in [-2^(bits-1), 2^(bits-1) - 1]."""
    rep = np.repeat(s.astype(np.float32), v.shape[1] // s.shape[1], axis=1)
    q = np.clip(np.round(v.astype(np.float32) / rep), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q * rep).astype(np.float32)


def qa_model(seed=0, sparse=True, rank_mode="slice", family="llama"):
    model = make_tiny(family, seed=seed)
    shears.wanda_prune(model, method="magnitude", sparsity=0.5, progress=False)
    shears.quantize_base(model, group_size=32)
    targets = ["c_attn", "c_proj", "c_fc"] if family == "gpt2" else TARGETS
    shears.add_elastic_lora(model, targets, ranks=[8, 6, 4], alpha=16, sparse_adapter=sparse,
                            rank_mode=rank_mode)
    # B scaled so the updates move weights across grid points (else rounding undoes them)
    return randomize_adapters(model, seed=seed, a_scale=1.0, b_scale=0.05)


def _expected(m, x, r):
    w = m.base_weight().detach().numpy()
    delta = (m.lora_B[:, :r] @ m.lora_A[:r]).detach().numpy() * m.scaling
    wq = hand_fake_quant(w + delta * (w != 0), grid_of(m.base_layer).scale.numpy())
    bias = m.base_layer.bias
    out = x.numpy() @ wq.T
    return out + (0 if bias is None else bias.detach().numpy()), wq


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_forward_is_the_hand_fake_quantized_merge(family):
    model = qa_model(family=family)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    moved = 0
    for _, m in elastic_modules(model):
        if m.in_features != 64:
            continue
        m.active_rank = 6
        expected, wq = _expected(m, x, 6)
        np.testing.assert_allclose(m(x).detach().numpy(), expected, rtol=1e-5, atol=1e-5)
        moved += int((wq != m.base_weight().detach().numpy()).sum())
    assert moved > 0  # the adapters moved weights to other grid points: the test can fail


@pytest.mark.parametrize("rank_mode", ["slice", "mask"])
def test_gradient_is_straight_through(rank_mode):
    model = qa_model(rank_mode=rank_mode)
    _, m = next(iter(elastic_modules(model)))
    m.active_rank = 6
    x = torch.randn(7, m.in_features, generator=torch.Generator().manual_seed(2))
    g = torch.randn(7, m.out_features, generator=torch.Generator().manual_seed(3))
    (m(x) * g).sum().backward()
    # STE definition: d/d(A, B) of x @ (W + s * B[:, :r] A[:r] * (W != 0)).T, no rounding
    a = m.lora_A.detach().clone().requires_grad_()
    b = m.lora_B.detach().clone().requires_grad_()
    w = m.base_weight().detach()
    merged = w + (b[:, :6] @ a[:6]) * m.scaling * (w != 0)
    (x @ merged.T * g).sum().backward()
    torch.testing.assert_close(m.lora_A.grad, a.grad)
    torch.testing.assert_close(m.lora_B.grad, b.grad)
    assert torch.all(m.lora_A.grad[6:] == 0) and m.lora_A.grad[:6].abs().sum() > 0


def test_merge_is_on_the_grid_keeps_zeros_and_logits():
    model = qa_model()
    ids = random_ids()
    config = {k: v[1] for k, v in shears.search_space(model).items()}  # middle ranks
    shears.set_config(model, config)
    with torch.no_grad():
        adapted = model(ids).logits
    base = {n: (m.base_weight().detach().clone(), grid_of(m.base_layer).scale.clone())
            for n, m in elastic_modules(model)}
    shears.merge_adapters(model)
    assert not list(elastic_modules(model))
    maps = quantized_modules(model)
    assert set(maps) == set(base)  # the grid is still recorded, for export_compressed
    for name, lin in maps.items():
        w0, s = base[name]
        w = weight_matrix(lin)
        assert torch.equal(grid_of(lin).scale, s)
        np.testing.assert_array_equal(w.numpy(), hand_fake_quant(w.numpy(), s.numpy()))
        assert torch.all(w[w0 == 0] == 0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_dense_adapter_over_grid_warns_and_leaves_the_grid_on_merge():
    with pytest.warns(UserWarning, match="sparse_adapter=False over a base quantized"):
        model = qa_model(sparse=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shears.merge_adapters(model, keep_sparsity=False)  # the default refuses dense ones
    assert not quantized_modules(model)  # no map claims a grid its weights left


def test_bf16_base_merges_on_the_grid():
    model = make_tiny("llama", dtype=torch.bfloat16)
    shears.quantize_base(model, group_size=32)
    shears.add_elastic_lora(model, ["up_proj"], ranks=[4], sparse_adapter=True)
    randomize_adapters(model, b_scale=0.05)
    shears.merge_adapters(model)
    for lin in quantized_modules(model).values():
        w, s = weight_matrix(lin), grid_of(lin).scale
        assert w.dtype == s.dtype == torch.bfloat16
        q = torch.round(w.float() / s.float().repeat_interleave(32, 1))
        assert torch.equal((q * s.float().repeat_interleave(32, 1)).bfloat16(), w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qa_forward_follows_a_cast_and_merges_and_exports_after_it(dtype, tmp_path):
    """Issue 17 §9: after model.to(dtype) the QA forward raised a raw dtype error (its
    grid-point weight stayed fp32). Now it computes in the adapters' (cast) dtype, like the
    other adapters, and the merge and the export follow: merged maps on their cast grid."""
    reference = qa_model()
    model = qa_model()
    model.to(dtype)
    ids = random_ids()
    with torch.no_grad():
        adapted = model(ids).logits
        fp32 = reference(ids).logits
    assert adapted.dtype == dtype
    # the same model up to the cast's rounding (an independent fp32 run)
    torch.testing.assert_close(adapted.float(), fp32, rtol=0.05, atol=0.05)
    shears.merge_adapters(model)
    with torch.no_grad():
        merged = model(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=0, atol=0)
    for lin in quantized_modules(model).values():
        w, s = weight_matrix(lin), grid_of(lin).scale
        assert w.dtype == s.dtype == dtype
        rep = s.float().repeat_interleave(32, 1)
        q = torch.round(w.float() / rep).clamp(-8, 7)
        assert torch.equal((q * rep).to(dtype), w)
    pytest.importorskip("compressed_tensors")
    shears.export_compressed(model, tmp_path)
    import transformers as T

    again = T.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    with torch.no_grad():  # not bitwise: model.to(dtype) also cast rotary inv_freq, a reload
        # keeps it fp32 (the first forward also decompresses the maps)
        torch.testing.assert_close(again(ids).logits, merged, rtol=0.02, atol=0.02)
    for name, lin in quantized_modules(model).items():  # the export packed them exactly
        assert torch.equal(again.get_submodule(name).weight, lin.weight), name
