"""NLS over a bitsandbytes NF4 base (QLoRA-style), on CPU: a tiny Llama pruned with Wanda,
saved, and reloaded in 4 bits. Compared against a hand-written NF4 quantizer (the QLoRA
paper's code book), a plain transformers reload with those weights, and stock PEFT."""

import pytest
import torch
import transformers as T
from tiny import make_tiny, random_ids, randomize_adapters
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from shears import (  # noqa: E402  (after the skip: these tests need bitsandbytes)
    add_elastic_lora,
    export_peft,
    load_adapter,
    merge_adapters,
    save_adapter,
    wanda_prune,
)
from shears.adapters import elastic_modules, get_config, heuristic_config, set_config  # noqa: E402
from shears.export.semi_structured import check_semi_structured  # noqa: E402
from shears.quantization.bnb import dequantized_weight, is_bnb_4bit, is_cpu_packed  # noqa: E402
from shears.search import hill_climb, make_evaluator  # noqa: E402
from shears.training import NLSTrainer  # noqa: E402

# NF4 code book, from the QLoRA paper (Dettmers et al. 2023, appendix E): the 16 quantiles.
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
BLOCK = 64  # bitsandbytes' default 4-bit block size, over the row-major flattened weight
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def nf4_round_trip(w: torch.Tensor) -> torch.Tensor:
    """Hand-written NF4 quantize + dequantize: per block of 64 consecutive values, absmax
    scaling and the nearest code."""
    blocks = w.float().reshape(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    codes = (blocks / absmax).unsqueeze(-1).sub(NF4).abs().argmin(-1)
    return (NF4[codes] * absmax).reshape(w.shape)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    model = make_tiny("llama")
    wanda_prune(model, random_ids(4, 32, seed=1), sparsity=0.5, progress=False)
    d = tmp_path_factory.mktemp("pruned")
    model.save_pretrained(d)
    return d


def load_nf4(d) -> nn.Module:
    q = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_compute_dtype=torch.float32)
    return T.AutoModelForCausalLM.from_pretrained(d, quantization_config=q)


def fp_reference(d) -> nn.Module:
    """The pruned model in fp32 with every 4-bit map's weight replaced by the hand-written
    NF4 round trip of its fp weight: what the 4-bit model should compute."""
    model = T.AutoModelForCausalLM.from_pretrained(d)
    quantized = {n for n, m in load_nf4(d).named_modules() if is_bnb_4bit(m)}
    with torch.no_grad():
        for name in quantized:
            w = model.get_submodule(name).weight
            w.copy_(nf4_round_trip(w))
    return model.eval()


def test_nf4_keeps_every_zero_of_the_pruned_base(pruned_dir):
    fp = T.AutoModelForCausalLM.from_pretrained(pruned_dir)
    q = load_nf4(pruned_dir)
    quantized = [(n, m) for n, m in q.named_modules() if is_bnb_4bit(m)]
    assert {n.rsplit(".", 1)[-1] for n, _ in quantized} >= set(TARGETS)
    for name, m in quantized:
        assert m.weight.quant_state.blocksize == BLOCK
        w = fp.get_submodule(name).weight
        deq = dequantized_weight(m)
        assert deq.shape == w.shape
        assert torch.equal(deq == 0, nf4_round_trip(w) == 0), name  # the zero code, exactly
        assert bool((deq[w == 0] == 0).all()), name  # every pruned zero stays exact
        torch.testing.assert_close(deq, nf4_round_trip(w), rtol=1e-6, atol=1e-7)


def test_adapters_over_nf4_compute_the_dequantized_model_plus_the_update(pruned_dir):
    q, ref = load_nf4(pruned_dir), fp_reference(pruned_dir)
    for model in (q, ref):  # raised "r_max=32 exceeds min(in, out)=1" on the packed weight
        add_elastic_lora(model, TARGETS, ranks=[32, 16, 8])
        randomize_adapters(model, seed=3)
    m = q.get_submodule("model.layers.0.self_attn.q_proj")
    assert (m.in_features, m.out_features) == (64, 64) and is_bnb_4bit(m.base_layer)
    ids = random_ids(2, 16, seed=5)
    for config in ({}, {g: 8 for g in get_config(q)}):
        set_config(q, config), set_config(ref, config)
        torch.testing.assert_close(q(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    # backward reaches the adapters of the first block through the 4-bit maps above them
    q.train(), ref.train()
    q(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(elastic_modules(q), elastic_modules(ref), strict=True):
        assert a.lora_B.grad.abs().sum() > 0, name
        torch.testing.assert_close(a.lora_B.grad, b.lora_B.grad, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(a.lora_A.grad, b.lora_A.grad, rtol=1e-3, atol=1e-5)
    assert not any(is_cpu_packed(m.base_layer) for _, m in elastic_modules(q))


def test_sparse_adapter_over_nf4_masks_with_the_dequantized_zeros(pruned_dir):
    fp = T.AutoModelForCausalLM.from_pretrained(pruned_dir)
    q, ref = load_nf4(pruned_dir), fp_reference(pruned_dir)
    for model in (q, ref):
        add_elastic_lora(model, TARGETS, ranks=[16, 8], sparse_adapter=True)
        randomize_adapters(model, seed=4)
    for name, m in elastic_modules(q):
        zeros = nf4_round_trip(fp.get_submodule(name).weight) == 0
        delta = m.delta_weight()
        assert bool((delta[zeros] == 0).all()) and bool((delta[~zeros] != 0).all()), name
    with torch.no_grad():
        torch.testing.assert_close(q(random_ids()).logits, ref(random_ids()).logits,
                                   rtol=1e-4, atol=1e-4)


def test_nls_trainer_trains_over_nf4_and_the_search_runs(pruned_dir, tmp_path):
    q = load_nf4(pruned_dir)
    add_elastic_lora(q, TARGETS, ranks=[16, 8], groups="qkv")
    before = {n: m.lora_B.detach().clone() for n, m in elastic_modules(q)}
    data = [{"input_ids": x, "labels": x.clone()} for x in random_ids(8, 16, seed=2)]
    args = T.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                               max_steps=3, learning_rate=1e-2, report_to="none",
                               save_strategy="no", use_cpu=True, disable_tqdm=True)
    with pytest.raises(ValueError, match="purely quantized"):  # the stock Trainer's check
        T.Trainer(model=q, args=args, train_dataset=data)
    trainer = NLSTrainer(model=q, args=args, train_dataset=data)
    assert "_hf_peft_config_loaded" not in q.__dict__  # set only during the check
    trainer.train()
    assert len(trainer.nls_history.records) == 3
    for name, m in elastic_modules(q):
        if name.startswith("model.layers.0."):  # the bottom block learns too
            assert not torch.equal(m.lora_B.detach(), before[name]), name
    # the searches: a loss judge over sub-adapters of the 4-bit model
    q.eval()
    ids = random_ids(2, 16, seed=9)

    def loss(model):
        with torch.no_grad():
            return model(ids, labels=ids).loss.item()

    result = hill_climb(q, make_evaluator(q, loss), start=heuristic_config(q), budget=4,
                        maximize=False, progress=False)
    assert result.best.score <= loss(q) + 1e-6  # no worse than the active start


def test_nls_trainer_still_refuses_nf4_without_trainable_adapters(pruned_dir, tmp_path):
    q = load_nf4(pruned_dir)
    add_elastic_lora(q, TARGETS, ranks=[16, 8])
    q.requires_grad_(False)
    args = T.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="purely quantized"):
        NLSTrainer(model=q, args=args, train_dataset=[])


def test_save_load_and_peft_export_over_nf4(pruned_dir, tmp_path):
    from peft import PeftModel

    q = load_nf4(pruned_dir)
    add_elastic_lora(q, TARGETS, ranks=[32, 16, 8], groups="qkv")
    randomize_adapters(q, seed=6)
    config = {g: [32, 16, 8][i % 3] for i, g in enumerate(get_config(q))}
    set_config(q, config)
    ids = random_ids(2, 16, seed=7)
    with torch.no_grad():
        expected = q(ids).logits
    save_adapter(q, tmp_path / "super")
    export_peft(q, tmp_path / "peft")

    again = load_nf4(pruned_dir)  # a second 4-bit load of the same pruned checkpoint
    load_adapter(again, tmp_path / "super")
    assert get_config(again) == config
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected, rtol=0, atol=0)

    base = load_nf4(pruned_dir)
    # bitsandbytes would repack its 4-bit maps for the AVX512-BF16 CPU kernel (bf16 absmax)
    # at the first eval forward; shears' adapters keep the trainable layout, so do the same.
    for m in base.modules():
        if is_bnb_4bit(m):
            m.support_avx512bf16_for_cpu = False
    peft = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_merge_and_semi_structured_refuse_a_4bit_base(pruned_dir):
    q = load_nf4(pruned_dir)
    add_elastic_lora(q, TARGETS, ranks=[16, 8])
    config = get_config(q)
    with pytest.raises(ValueError, match=r"4-bit base.*export_peft.*quantize_base"):
        merge_adapters(q, {g: 8 for g in config})
    assert get_config(q) == config and len(list(elastic_modules(q))) == 10  # nothing changed
    problems = check_semi_structured(q, ["model.layers.0.mlp.gate_proj"])
    assert problems and "bitsandbytes 4-bit" in problems[0]


def test_a_layer_repacked_for_cpu_inference_is_refused(pruned_dir):
    q = load_nf4(pruned_dir)
    with torch.no_grad():
        q(random_ids(1, 8))  # eval, no grad: bitsandbytes may repack for AVX512-BF16
    if not any(is_cpu_packed(m) for m in q.modules()):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    with pytest.raises(ValueError, match="repacked"):
        add_elastic_lora(q, TARGETS, ranks=[16, 8])
    assert not list(elastic_modules(q))


# issue 17 §4: the sparsity report reads 4-bit maps as their dequantized (out, in) weights

def test_sparsity_report_counts_the_dequantized_4bit_maps(pruned_dir):
    from shears import sparsity_report

    fp = T.AutoModelForCausalLM.from_pretrained(pruned_dir)
    q = load_nf4(pruned_dir)
    quantized = {n for n, m in q.named_modules() if is_bnb_4bit(m)}
    report, fp_report = sparsity_report(q), sparsity_report(fp)
    assert [m.name for m in report.modules] == [m.name for m in fp_report.modules]
    for row in report.modules:
        w = fp.get_submodule(row.name).weight  # hand-written NF4 of the fp weight
        assert row.name in quantized and row.shape == tuple(w.shape), row
        assert (row.zeros, row.numel) == (int((nf4_round_trip(w) == 0).sum()), w.numel()), row
    assert report.sparsity >= 0.5 > fp_report.sparsity - 1e-3
    # totals: every parameter of the fp model, each 4-bit map by its dequantized entries
    expected = 0
    for name, p in fp.named_parameters():
        module = name.rsplit(".", 1)[0]
        expected += int(torch.count_nonzero(nf4_round_trip(p) if module in quantized else p))
    assert report.total_parameters == fp_report.total_parameters
    assert report.nonzero_parameters == expected


def test_sparsity_report_refuses_a_layer_repacked_for_cpu_inference(pruned_dir):
    from shears import sparsity_report

    q = load_nf4(pruned_dir)
    with torch.no_grad():
        q(random_ids(1, 8))  # eval, no grad: bitsandbytes may repack for AVX512-BF16
    if not any(is_cpu_packed(m) for m in q.modules()):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    with pytest.raises(ValueError, match="repacked"):
        sparsity_report(q)


# issue 17 §10: the 4-bit model's real way out is named

def test_export_compressed_and_quantize_base_name_export_peft_for_a_4bit_model(pruned_dir,
                                                                                tmp_path):
    from shears import export_compressed, quantize_base

    q = load_nf4(pruned_dir)
    with pytest.raises(ValueError, match=r"bitsandbytes.*export_peft"):
        quantize_base(q, group_size=32)
    pytest.importorskip("compressed_tensors")
    with pytest.raises(ValueError, match=r"bitsandbytes.*export_peft"):
        export_compressed(q, tmp_path / "a")
    add_elastic_lora(q, TARGETS, ranks=[8])  # with adapters: not "merge them first"
    with pytest.raises(ValueError, match=r"bitsandbytes.*export_peft"):
        export_compressed(q, tmp_path / "b")
    assert not any(tmp_path.iterdir())
