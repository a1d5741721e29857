"""export_compressed: the merged QA-SparsePEFT model as a compressed-tensors pack-quantized
checkpoint, judged by a plain transformers reload (compressed-tensors decompresses it)."""

import json

import pytest
import torch
import transformers as T
from safetensors import safe_open
from test_qa_sparse import hand_fake_quant, qa_model
from tiny import VOCAB, make_tiny, random_ids

import shears
from shears.quantization import quantized_modules

pytest.importorskip("compressed_tensors")


def _reload(directory):
    return T.AutoModelForCausalLM.from_pretrained(directory).eval()


def test_merged_qa_model_reloads_with_the_same_logits(tmp_path):
    model = qa_model()
    ids = random_ids()
    with torch.no_grad():
        adapted = model(ids).logits
    shears.merge_adapters(model)
    base_zeros = {n: m.weight == 0 for n, m in quantized_modules(model).items()}
    out = shears.export_compressed(model, tmp_path)
    assert sorted(out.layers) == sorted(base_zeros) and (out.bits, out.group_size) == (4, 32)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert weights["symmetric"] and weights["strategy"] == "group" and weights["num_bits"] == 4
    again = _reload(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(again(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    for name, zeros in base_zeros.items():
        w = again.get_submodule(name).weight
        assert torch.all(w[zeros] == 0)
        s = again.get_submodule(name).weight_scale  # the scales travelled
        assert torch.equal(w, torch.from_numpy(hand_fake_quant(w.numpy(), s.numpy())))


def _llama_128(dtype):
    config = T.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                           tie_word_embeddings=True)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def test_bf16_group_128_takes_about_a_quarter_on_disk(tmp_path):
    model = _llama_128(torch.bfloat16)
    shears.wanda_prune(model, method="magnitude", sparsity=0.5, progress=False)
    shears.quantize_base(model, group_size=128)
    out = shears.export_compressed(model, tmp_path)
    stored = bf16 = 0
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            module = key.rsplit(".", 1)[0]
            if module in out.layers:
                t = f.get_tensor(key)
                stored += t.numel() * t.element_size()
                if key.endswith("weight_shape"):
                    bf16 += int(torch.prod(t)) * 2
    assert stored == out.packed_bytes and bf16 == out.bf16_bytes
    assert 0.25 < stored / bf16 < 0.26  # 4 bits + one bf16 scale per 128 entries
    again = _reload(tmp_path)
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def _refused(model, tmp_path, match):
    target = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        shears.export_compressed(model, target)
    assert not target.exists()


def test_refusals_write_nothing(tmp_path):
    _refused(make_tiny("llama"), tmp_path, "quantize_base")
    _refused(qa_model(), tmp_path, "merge_adapters")
    model = make_tiny("llama")
    shears.quantize_base(model, group_size=32)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    _refused(model, tmp_path, r"layers\.1\.mlp\.up_proj.*no longer on its grid")
    gpt2 = make_tiny("gpt2")
    shears.quantize_base(gpt2, group_size=32)
    _refused(gpt2, tmp_path, "Conv1D")


@pytest.mark.slow
def test_smollm2_int4_reloads_in_plain_transformers(tmp_path):
    """SmolLM2-135M (hidden 576: group 64), bf16, magnitude 50%: the compressed checkpoint
    reloads with the same logits and its maps take 0.266x their bf16 bytes."""
    from smollm2 import load_smollm2

    model, tok = load_smollm2(dtype=torch.bfloat16)
    shears.wanda_prune(model, method="magnitude", sparsity=0.5, progress=False)
    shears.quantize_base(model, group_size=64)
    out = shears.export_compressed(model, tmp_path)
    assert len(out.layers) == 210 and 0.26 < out.packed_bytes / out.bf16_bytes < 0.27
    ids = tok("The capital of France is Paris, and the capital of Italy is",
              return_tensors="pt").input_ids
    again = _reload(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
