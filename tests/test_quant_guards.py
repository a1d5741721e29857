"""Issue 17 §1, §10, §11: quantize_base, the grid and the merge refuse bad inputs clearly,
before anything changes (every refusal below compares the whole state dict, NaN included)."""

import math

import numpy as np
import pytest
import torch
import transformers as T
from test_qa_sparse import qa_model
from tiny import CONFIGS, VOCAB, make_tiny, randomize_adapters

import shears
from shears.adapters import elastic_modules, get_config
from shears.quantization import grid_of, quantized_modules


def pruned(family="llama"):
    model = make_tiny(family)
    shears.wanda_prune(model, method="magnitude", sparsity=0.5, progress=False)
    return model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True, msg=k)


def refused(model, fn, error=ValueError):
    """Run ``fn``, expect ``error``, check the model did not change; return the message."""
    before = snapshot(model)
    with pytest.raises(error) as e:
        fn()
    assert_same(model, before)
    return str(e.value)


# §1: non-finite weights

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_quantize_base_refuses_non_finite_weights_naming_the_map(bad):
    model = pruned()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    msg = refused(model, lambda: shears.quantize_base(model, group_size=32))
    assert "model.layers.1.mlp.up_proj" in msg and "NaN/inf" in msg
    assert not quantized_modules(model)


def test_a_non_finite_map_left_out_with_exclude_is_not_refused():
    model = pruned()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = math.nan
    shears.quantize_base(model, group_size=32, exclude=r".*\.1\.mlp\.up_proj")
    assert "model.layers.1.mlp.up_proj" not in quantized_modules(model)
    assert "model.layers.0.mlp.up_proj" in quantized_modules(model)


# §10: meta device, NaN scales

def test_quantize_base_refuses_a_meta_device_model():
    config = CONFIGS["llama"]()
    config.vocab_size = VOCAB
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*meta device"):
        shears.quantize_base(model, group_size=32)
    assert not quantized_modules(model)


def _poison_scale(model, value=math.nan):
    name, m = next(iter(elastic_modules(model)))
    with torch.no_grad():
        grid_of(m.base_layer).scale[2, 1] = value
    return name


@pytest.mark.parametrize("value", [math.nan, math.inf, 0.0, -1.0])
def test_merge_refuses_a_bad_recorded_scale_before_changing_anything(value):
    model = qa_model()
    name = _poison_scale(model, value)
    config = get_config(model)
    msg = refused(model, lambda: shears.merge_adapters(model))
    assert name in msg and "scale" in msg
    assert len(list(elastic_modules(model))) == 14 and get_config(model) == config


def test_export_refuses_a_nan_scale_as_such_not_as_off_the_grid(tmp_path):
    pytest.importorskip("compressed_tensors")
    model = pruned()
    shears.quantize_base(model, group_size=32)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight_scale[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*NaN") as e:
        shears.export_compressed(model, tmp_path)
    assert "off its grid" not in str(e.value) and not any(tmp_path.iterdir())


def test_qa_adapters_refuse_a_base_whose_scale_is_not_finite():
    model = pruned()
    shears.quantize_base(model, group_size=32)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight_scale[1, 0] = math.inf
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*scale"):
        shears.add_elastic_lora(model, ["q_proj"], ranks=[4], sparse_adapter=True)
    assert not list(elastic_modules(model))


# §11: validation

@pytest.mark.parametrize("bits", [4.0, True, "4", None, 4.5])
def test_bits_must_be_an_int(bits):
    model = pruned()
    msg = refused(model, lambda: shears.quantize_base(model, bits=bits, group_size=32))
    assert "bits" in msg
    assert not quantized_modules(model)


def test_numpy_ints_are_accepted_and_stored_as_plain_ints():
    model = pruned()
    report = shears.quantize_base(model, bits=np.int64(4), group_size=np.int32(32))
    assert type(report.bits) is int and type(report.group_size) is int
    for m in quantized_modules(model).values():
        g = grid_of(m)
        assert type(g.bits) is int and type(g.group_size) is int
        assert (g.bits, g.group_size) == (4, 32)


@pytest.mark.parametrize("flag", ["no", "False", 0, 1, None, 1.0])
def test_sparse_adapter_must_be_a_bool(flag):
    model = pruned()
    msg = refused(model, lambda: shears.add_elastic_lora(model, ["q_proj"], ranks=[4],
                                                        sparse_adapter=flag), TypeError)
    assert "sparse_adapter" in msg and not list(elastic_modules(model))
    layer = torch.nn.Linear(8, 8)
    with pytest.raises(TypeError, match="sparse_adapter"):
        shears.ElasticLoRALinear(layer, ranks=[2], sparse_adapter=flag)
    assert layer.weight.requires_grad  # refused before the base was frozen


def test_numpy_bool_sparse_adapter_is_accepted_as_a_bool():
    model = pruned()
    shears.add_elastic_lora(model, ["q_proj"], ranks=[4], sparse_adapter=np.bool_(True))
    assert all(m.sparse_adapter is True for _, m in elastic_modules(model))


def _adapted(sparse=True):
    model = pruned()
    shears.add_elastic_lora(model, ["q_proj", "v_proj"], ranks=[4, 2], sparse_adapter=sparse)
    return randomize_adapters(model)


@pytest.mark.parametrize("keep", ["yes", "no", 0, 1, 1.0])
def test_keep_sparsity_must_be_none_or_a_bool(keep):
    model = _adapted(sparse=False)
    msg = refused(model, lambda: shears.merge_adapters(model, keep_sparsity=keep), TypeError)
    assert "keep_sparsity" in msg and len(list(elastic_modules(model))) == 4


@pytest.mark.parametrize("tokens", [-1, 0, 1.5, True, "64"])
def test_probe_tokens_must_be_a_positive_int(tokens):
    model = _adapted(sparse=False)
    msg = refused(model, lambda: shears.merge_adapters(model, keep_sparsity=True,
                                                      probe_tokens=tokens))
    assert "probe_tokens" in msg and len(list(elastic_modules(model))) == 4


@pytest.mark.parametrize("config", [[16], "abc", 4, (("g", 4),)])
def test_a_configuration_must_be_a_mapping_everywhere(config, tmp_path):
    model = _adapted()
    for fn in (lambda: shears.merge_adapters(model, config),
               lambda: shears.set_config(model, config),
               lambda: shears.export_peft(_adapted(sparse=False), tmp_path / "p", config)):
        msg = refused(model, fn, TypeError)
        assert "mapping" in msg
    assert len(list(elastic_modules(model))) == 4 and not (tmp_path / "p").exists()


@pytest.mark.parametrize("flag", ["no", None, 0])
def test_load_adapter_check_base_must_be_a_bool(flag, tmp_path):
    shears.save_adapter(_adapted(), tmp_path)
    model = pruned()
    msg = refused(model, lambda: shears.load_adapter(model, tmp_path, check_base=flag),
                  TypeError)
    assert "check_base" in msg and not list(elastic_modules(model))


@pytest.mark.parametrize("targets", [5, [5], ["q_proj", None]])
def test_target_modules_must_be_names(targets):
    model = pruned()
    msg = refused(model, lambda: shears.add_elastic_lora(model, targets, ranks=[4]), TypeError)
    assert "target_modules" in msg


def test_sparsity_report_modules_must_be_a_list_of_names():
    model = pruned()
    with pytest.raises(TypeError, match="list of qualified names"):
        shears.sparsity_report(model, "model.layers.0.self_attn.q_proj")
    report = shears.sparsity_report(model, ["model.layers.0.self_attn.q_proj"])
    assert [m.name for m in report.modules] == ["model.layers.0.self_attn.q_proj"]
