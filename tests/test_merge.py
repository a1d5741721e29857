"""merge_adapters: the sub-adapter merged into the sparse base, against hand computations."""

import json
import re
import warnings

import pytest
import torch
from export_models import logits, make_base, pruned_adapted, same_state, state
from tiny import CONFIGS, VOCAB, random_ids, randomize_adapters
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from shears import merge_adapters, sparsity_report, wanda_prune
from shears.adapters import (
    ElasticLoRALinear,
    add_elastic_lora,
    elastic_modules,
    get_config,
    random_config,
    search_space,
    set_config,
)
from shears.pruning.layers import weight_matrix


def snapshot(model, config):
    """Per adapted module, what a hand computation of the merge needs (copies)."""
    out = {}
    for name, m in elastic_modules(model):
        r = config[m.group]
        out[name] = dict(
            w=weight_matrix(m.base_layer).clone(),
            delta=(m.alpha / m.r_max) * (m.lora_B.detach()[:, :r] @ m.lora_A.detach()[:r]),
        )
    return out


def no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_sparse_adapters_merge_exactly_and_survive_save_pretrained(tmp_path, family):
    _, model = pruned_adapted(family, sparse_adapter=True)
    config = random_config(model, 2)
    set_config(model, config)
    expected = logits(model)
    hand = snapshot(model, config)
    set_config(model, {g: search_space(model)[g][0] for g in config})  # merge must set config

    merged = no_warnings(merge_adapters, model, config)
    assert merged is model
    assert not any(isinstance(m, ElasticLoRALinear) for m in model.modules())
    assert not any("lora_" in k or "base_layer" in k for k in model.state_dict())
    for name, h in hand.items():
        module = model.get_submodule(name)
        assert type(module) is (Conv1D if family == "gpt2" else nn.Linear)
        w = weight_matrix(module)
        pruned = h["w"] == 0
        assert torch.all(w[pruned] == 0)  # every zero of the base is kept
        torch.testing.assert_close(w, h["w"] + h["delta"] * ~pruned, rtol=1e-6, atol=1e-6)
    assert (logits(model) - expected).abs().max() <= 1e-4
    assert all(p.requires_grad for p in model.parameters())  # as before add_elastic_lora

    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(logits(reloaded.eval()), logits(model))
    assert sparsity_report(reloaded).sparsity == 0.5
    # The adapter layout left config.json with the adapters: the checkpoint is a plain model.
    assert "shears_super_adapter" not in json.loads((tmp_path / "config.json").read_text())
    assert not hasattr(model.config, "shears_super_adapter")


def test_requires_grad_comes_back_as_it_was():
    _, model = pruned_adapted("llama", sparse_adapter=True)
    merge_adapters(model)  # the helper adapted a fresh model: everything was trainable
    assert all(p.requires_grad for p in model.parameters())

    model.model.embed_tokens.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    add_elastic_lora(model, ["q_proj", "up_proj"], ranks=[8, 4], sparse_adapter=True)
    merge_adapters(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not hasattr(model, "_shears_requires_grad")


def percent(text, label):
    return float(re.search(rf"{label} (-?[\d.]+)%", text).group(1)) / 100


def test_dense_adapters_keep_sparsity_warns_with_the_measured_change():
    _, model = pruned_adapted("llama")
    config = get_config(model)
    hand = snapshot(model, config)
    with pytest.warns(UserWarning, match=r"keep_sparsity=True") as caught:
        merge_adapters(model, keep_sparsity=True, probe_tokens=32)
    message = str(caught[0].message)

    rel, share = {}, {}
    for name, h in hand.items():  # independent: the probe rebuilt from the documented seed
        x = torch.randn(32, h["w"].shape[1], generator=torch.Generator().manual_seed(0))
        pruned = h["w"] == 0
        lost = x @ (h["delta"] * pruned).T
        rel[name] = float(lost.norm() / (x @ (h["w"] + h["delta"]).T).norm())
        share[name] = float(lost.norm() / (x @ h["delta"].T).norm())
        w = weight_matrix(model.get_submodule(name))
        assert torch.all(w[pruned] == 0)
        torch.testing.assert_close(w, h["w"] + h["delta"] * ~pruned, rtol=1e-6, atol=1e-6)
    worst = max(rel, key=rel.get)
    assert f"{len(rel)} of {len(rel)} adapters" in message
    outputs, removed = message.split("share of the adapters' update removed")
    assert percent(outputs, "mean") == pytest.approx(sum(rel.values()) / len(rel), abs=1e-6)
    assert percent(outputs, "max") == pytest.approx(rel[worst], abs=1e-6)
    assert f"({worst})" in outputs
    assert percent(removed, "mean") == pytest.approx(sum(share.values()) / len(share), abs=1e-6)
    assert percent(removed, "max") == pytest.approx(max(share.values()), abs=1e-6)
    assert rel[worst] > 0.01 and 0.3 < min(share.values())  # the masked merge really differs


def test_dense_merge_without_keep_sparsity_warns_with_the_sparsity():
    _, model = pruned_adapted("llama")
    expected = logits(model)
    hand = snapshot(model, get_config(model))
    with pytest.warns(UserWarning, match=r"keep_sparsity=False") as caught:
        merge_adapters(model, keep_sparsity=False)
    message = str(caught[0].message)
    numel = sum(h["w"].numel() for h in hand.values())
    zeros_before = sum(int((h["w"] == 0).sum()) for h in hand.values())
    zeros_after = sum(int((weight_matrix(model.get_submodule(n)) == 0).sum()) for n in hand)
    match = re.search(r"from ([\d.]+)% to ([\d.]+)% \((\d+) -> (\d+) zeros of (\d+)\)", message)
    assert match, message
    assert [int(g) for g in match.groups()[2:]] == [zeros_before, zeros_after, numel]
    assert float(match.group(1)) / 100 == pytest.approx(zeros_before / numel, abs=1e-6)
    assert float(match.group(2)) / 100 == pytest.approx(zeros_after / numel, abs=1e-6)
    assert zeros_before / numel == 0.5 and zeros_after < zeros_before
    assert (logits(model) - expected).abs().max() <= 1e-4  # a dense merge is exact


def test_sparse_adapters_merged_densely_lose_nothing_and_do_not_warn():
    _, model = pruned_adapted("llama", sparse_adapter=True)
    no_warnings(merge_adapters, model, keep_sparsity=False)
    assert sparsity_report(model).sparsity == 0.5


def test_bf16_base():
    _, model = pruned_adapted("llama", sparse_adapter=True, dtype=torch.bfloat16)
    config = random_config(model, 4)
    set_config(model, config)
    expected = logits(model)
    hand = snapshot(model, config)
    no_warnings(merge_adapters, model)
    for name, h in hand.items():
        w = weight_matrix(model.get_submodule(name))
        assert w.dtype == torch.bfloat16
        pruned = h["w"] == 0
        assert torch.all(w[pruned] == 0)
        ref = (h["w"].float() + h["delta"] * ~pruned).to(torch.bfloat16)  # summed in fp32
        assert torch.equal(w, ref)
    assert sparsity_report(model).sparsity == 0.5
    got = logits(model)
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()  # bf16 rounding


def test_bad_configs_leave_the_model_bitwise_unchanged():
    _, model = pruned_adapted("llama", sparse_adapter=True)
    before, active = state(model), get_config(model)
    group = next(iter(active))
    with pytest.raises(KeyError, match="unknown adapter group 'no.such.group'"):
        merge_adapters(model, {group: active[group], "no.such.group": 4})
    with pytest.raises(ValueError, match=r"rank 5 of group .* is not in \[16, 8, 4\]"):
        merge_adapters(model, {group: 5})
    assert same_state(model, before) and get_config(model) == active
    assert sum(isinstance(m, ElasticLoRALinear) for m in model.modules()) == 10
    with pytest.raises(ValueError, match="no elastic"):
        merge_adapters(nn.Sequential(nn.Linear(4, 4)))


# ---- the default must not lose training (issue 12, 2f) ------------------------------------


def test_default_refuses_dense_adapters_on_a_sparse_base_and_changes_nothing():
    _, model = pruned_adapted("llama")  # dense adapters (the paper's), Wanda 50% base
    before, active = state(model), get_config(model)
    other = random_config(model, 3)
    with pytest.raises(ValueError) as caught:
        merge_adapters(model, other)
    message = str(caught.value)
    for phrase in ("sparse_adapter=True", "keep_sparsity=True", "lossy", "keep_sparsity=False",
                   "dense", "unmerged", "save_adapter", "export_peft"):
        assert phrase in message, phrase
    assert same_state(model, before) and get_config(model) == active  # config not applied
    assert sum(isinstance(m, ElasticLoRALinear) for m in model.modules()) == 10
    assert hasattr(model.config, "shears_super_adapter")


def test_default_merges_dense_adapters_exactly_where_the_base_has_no_zeros():
    """Nothing to choose between: masking by a base without zeros drops nothing."""
    model = make_base("llama")
    add_elastic_lora(model, ["q_proj", "down_proj"], ranks=[8, 4])
    randomize_adapters(model, seed=2, a_scale=0.2, b_scale=0.2)
    expected = logits(model)
    no_warnings(merge_adapters, model)
    assert (logits(model) - expected).abs().max() <= 1e-4


# ---- a tied lm_head (issue 12, 2a) ---------------------------------------------------------


def tied_llama(sparse_adapter=True, targets=("q_proj", "lm_head")):
    """A Wanda-50% tiny Llama whose lm_head shares its weight with the input embeddings,
    with random adapters on ``targets`` (the lm_head among them)."""
    config = CONFIGS["llama"]()
    config.vocab_size, config.tie_word_embeddings = VOCAB, True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    wanda_prune(model, random_ids(4, 16, seed=7), 0.5, progress=False)
    add_elastic_lora(model, list(targets), ranks=[8, 4], sparse_adapter=sparse_adapter)
    return randomize_adapters(model, seed=3, a_scale=0.2, b_scale=0.2)


@pytest.mark.parametrize("sparse_adapter", [True, False])
def test_tied_lm_head_is_untied_and_the_merge_equals_the_adapted_model(tmp_path,
                                                                        sparse_adapter):
    model = tied_llama(sparse_adapter)
    embeddings = model.model.embed_tokens.weight.detach().clone()
    expected = logits(model)
    merge_adapters(model, keep_sparsity=None if sparse_adapter else False)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)  # inputs untouched
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert (logits(model) - expected).abs().max() <= 1e-4
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.requires_grad  # as the shared weight was before the adapters
    model.tie_weights()  # transformers' own re-tying must leave it untied now
    assert model.lm_head.weight is not model.model.embed_tokens.weight

    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.model.embed_tokens.weight, embeddings)
    assert (logits(reloaded.eval()) - expected).abs().max() <= 1e-4


def test_weight_shared_with_another_module_is_refused_before_anything_changes():
    _, model = pruned_adapted("llama", sparse_adapter=True)
    merge_adapters(model)
    layers = model.model.layers
    layers[1].mlp.up_proj.weight = layers[0].mlp.up_proj.weight  # one tensor, two maps
    add_elastic_lora(model, r"model\.layers\.0\.mlp\.up_proj", ranks=[8, 4],
                     sparse_adapter=True)
    randomize_adapters(model, seed=4)
    before = state(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj.*"
                                         r"model\.layers\.1\.mlp\.up_proj\.weight"):
        merge_adapters(model)
    assert same_state(model, before)
    assert isinstance(layers[0].mlp.up_proj, ElasticLoRALinear)


@pytest.mark.slow
def test_smollm2_tied_lm_head_merges_exactly_and_reloads_untied(tmp_path):
    """SmolLM2-135M ties lm_head to the input embeddings: the real case of issue 12, 2a."""
    from smollm2 import load_smollm2

    model, _ = load_smollm2()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    add_elastic_lora(model, ["q_proj", "lm_head"], ranks=[8, 4], sparse_adapter=True)
    randomize_adapters(model, seed=5, a_scale=0.05, b_scale=0.05)
    ids = torch.randint(0, model.config.vocab_size, (1, 16),
                        generator=torch.Generator().manual_seed(0))
    embeddings = model.model.embed_tokens.weight.detach().clone()
    expected = logits(model, ids)
    merge_adapters(model)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert (logits(model, ids) - expected).abs().max() <= 1e-3
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    assert (logits(reloaded, ids) - expected).abs().max() <= 1e-3
