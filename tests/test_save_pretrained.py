"""No silent loss through ``save_pretrained``: a model carrying elastic adapters saves its
(pruned) base under the original names, plain ``from_pretrained`` gets it back bitwise, and
``load_adapter`` recovers the super-adapter from the same directory."""

import copy
import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from tiny import CONFIGS, VOCAB, make_tiny, random_ids, randomize_adapters
from transformers import AutoModelForCausalLM
from transformers.trainer_utils import load_sharded_checkpoint

from shears.adapters import (
    add_elastic_lora,
    clear_adapter_metadata,
    elastic_modules,
    get_config,
    maximal_config,
    minimal_config,
    random_config,
    search_space,
    set_config,
)
from shears.export import load_adapter, save_adapter
from shears.pruning import wanda_prune

# case -> (embedding tying of the tiny Qwen2, targets, groups)
CASES = {
    "llama": ({}, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], "qkv"),
    "gpt2": ({}, ["c_attn", "c_proj", "c_fc"], "layer"),  # Conv1D, weight (in, out)
    "opt": ({}, ["q_proj", "k_proj", "v_proj", "fc1", "fc2"], "qkv"),  # biases
    "qwen2": ({"tie": False}, ["q_proj", "k_proj", "v_proj", "up_proj"], "qkv"),
    "qwen2-tied": ({"tie": True}, ["q_proj", "k_proj", "v_proj", "down_proj"], "module"),
}


def pruned(case):
    """A Wanda-pruned tiny model of ``case`` (random calibration ids) and a copy of its state."""
    opts, _, _ = CASES[case]
    if "tie" in opts:
        config = CONFIGS["qwen2"]()
        config.vocab_size, config.tie_word_embeddings = VOCAB, opts["tie"]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == opts["tie"]
    else:
        model = make_tiny(case)
    wanda_prune(model, random_ids(4, 32, seed=1), sparsity=0.5, progress=False)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    return model, base


def adapt(model, case, sparse_adapter=False):
    """Attach adapters (ranks [8, 4, 2]) with random A and B, as after training."""
    _, targets, groups = CASES[case]
    add_elastic_lora(model, targets, ranks=[8, 4, 2], alpha=16.0, groups=groups,
                     sparse_adapter=sparse_adapter)
    return randomize_adapters(model, seed=7)


def logits(model, config=None):
    if config is not None:
        set_config(model, config)
    with torch.no_grad():
        return model(random_ids(2, 12, seed=3)).logits


def assert_base_equal(model, base):
    """Every tensor of the pruned base, bitwise, in the plain model's own state dict."""
    state = model.state_dict()
    assert set(state) == set(base)
    for k, v in base.items():
        assert torch.equal(state[k], v), k


def lora_keys(model):
    return {f"{n}.{k}" for n, _ in elastic_modules(model)
            for k in ("lora_A", "lora_B", "lora_active_rank")}


@pytest.mark.parametrize("case", list(CASES))
def test_plain_from_pretrained_gets_pruned_base_then_load_adapter_recovers(tmp_path, case):
    model, base = pruned(case)
    base_logits = logits(model)
    adapt(model, case, sparse_adapter=case == "gpt2")
    active = random_config(model, 5)
    other = random_config(model, 6)
    assert active != other
    expected = {"active": logits(model, active), "other": logits(model, other)}
    set_config(model, active)
    model.save_pretrained(tmp_path)

    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    # The only keys plain transformers skips are the super-adapter's own.
    assert info["unexpected_keys"] == lora_keys(model)
    assert_base_equal(plain, base)
    assert torch.equal(logits(plain.eval()), base_logits)

    load_adapter(plain, tmp_path)
    assert get_config(plain) == active and search_space(plain) == search_space(model)
    assert torch.equal(logits(plain), expected["active"])
    assert torch.equal(logits(plain, other), expected["other"])
    assert all(m.sparse_adapter == (case == "gpt2") for _, m in elastic_modules(plain))


def test_tied_lm_head_carrying_an_adapter(tmp_path):
    model, base = pruned("qwen2-tied")
    add_elastic_lora(model, ["q_proj", "lm_head"], ranks=[8, 4])
    model.save_pretrained(tmp_path)
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set()
    assert_base_equal(plain, base)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight


def test_sharded_checkpoint_and_index(tmp_path):
    model, base = pruned("llama")
    adapt(model, "llama")
    set_config(model, minimal_config(model))
    expected = logits(model)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3
    assert not [k for k in index["weight_map"] if "base_layer" in k]
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set()
    assert_base_equal(plain, base)
    load_adapter(plain, tmp_path)
    assert get_config(plain) == minimal_config(model)
    assert torch.equal(logits(plain), expected)
    # The Trainer resumes sharded checkpoints by comparing the index with model.state_dict()
    # strictly: an adapted model must match the index it wrote.
    other = adapt(make_tiny("llama", seed=1), "llama")
    load_sharded_checkpoint(other, tmp_path, strict=True)
    assert torch.equal(logits(other), expected)


def test_state_dict_round_trip_deepcopy_and_old_names():
    model, _ = pruned("opt")
    adapt(model, "opt")
    set_config(model, random_config(model, 1))
    state = model.state_dict()
    assert not [k for k in state if "base_layer" in k]
    q = "model.decoder.layers.0.self_attn.q_proj"
    assert torch.equal(state[f"{q}.weight"], model.get_submodule(q).base_layer.weight)
    assert torch.equal(state[f"{q}.bias"], model.get_submodule(q).base_layer.bias)

    other = adapt(make_tiny("opt", seed=2), "opt")
    result = other.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert get_config(other) == get_config(model)
    assert torch.equal(logits(other), logits(model))

    set_config(model, maximal_config(model))
    twin = copy.deepcopy(model)
    set_config(twin, minimal_config(twin))  # the copy's hooks must read the copy
    twin_state = twin.state_dict()
    assert set(twin_state) == set(state)
    assert int(twin_state[f"{q}.lora_active_rank"]) == 2
    assert int(model.state_dict()[f"{q}.lora_active_rank"]) == 8
    twin.load_state_dict(model.state_dict())
    assert get_config(twin) == maximal_config(model)
    assert torch.equal(logits(twin), logits(model))

    # A state dict in the old layout (named as the parameters, no active rank) still loads.
    old = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    fresh = adapt(make_tiny("opt", seed=3), "opt")
    set_config(fresh, get_config(model))
    fresh.load_state_dict(old, strict=True)  # OPT has no persistent buffers
    assert torch.equal(logits(fresh), logits(model))


def test_distributed_checkpoint_state_dict_api_resolves_the_renamed_keys():
    """FSDP2 checkpoints go through torch.distributed.checkpoint's get/set_model_state_dict,
    which resolve every key by getattr on the modules: the renamed base tensors and the
    active rank must resolve to the tensors plain ``state_dict`` gives."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    model, _ = pruned("opt")
    adapt(model, "opt")
    set_config(model, random_config(model, 4))
    state = model.state_dict()
    dcp_state = get_model_state_dict(model)
    assert set(dcp_state) == set(state)
    for k, v in state.items():
        assert torch.equal(dcp_state[k], v), k

    other = adapt(make_tiny("opt", seed=2), "opt")
    set_model_state_dict(other, dcp_state, options=StateDictOptions(strict=True))
    assert get_config(other) == get_config(model)
    assert torch.equal(logits(other), logits(model))


def test_bad_state_dict_entries_are_refused():
    model = adapt(make_tiny("llama"), "llama")
    state = model.state_dict()
    q = "model.layers.0.self_attn.q_proj"
    bad_rank = dict(state, **{f"{q}.lora_active_rank": torch.tensor(5)})
    with pytest.raises(RuntimeError, match=r"lora_active_rank.*5"):
        model.load_state_dict(bad_rank)
    both = dict(state, **{f"{q}.base_layer.weight": state[f"{q}.weight"]})
    with pytest.raises(RuntimeError, match="both"):
        model.load_state_dict(both)


def hand_digest(directory, targets):
    """sha256 over each target's saved A then B: "lora_A:<dtype>:<shape>;" then the bytes."""
    h = hashlib.sha256()
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        for t in targets:
            for key in ("lora_A", "lora_B"):
                x = f.get_tensor(f"{t}.{key}")
                h.update(f"{key}:{x.dtype}:{tuple(x.shape)};".encode())
                h.update(x.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def test_metadata_on_config_follows_the_adapters(tmp_path):
    model, _ = pruned("llama")
    assert not hasattr(model.config, "shears_super_adapter")
    adapt(model, "llama")
    meta = model.config.shears_super_adapter
    assert meta["ranks"] == [8, 4, 2] and meta["alpha"] == 16.0 and len(meta["targets"]) == 10
    assert meta["groups"]["model.layers.1.self_attn.k_proj"] == "model.layers.1.self_attn.qkv_proj"
    model.save_pretrained(tmp_path / "a")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    saved = dict(plain.config.shears_super_adapter)  # stale until adapters are attached
    assert saved.pop("adapter_digest") == hand_digest(tmp_path / "a", meta["targets"])
    assert saved == meta
    add_elastic_lora(plain, ["o_proj"], ranks=[4])  # a new layout replaces it
    assert plain.config.shears_super_adapter["targets"] == [
        "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert clear_adapter_metadata(plain) and not hasattr(plain.config, "shears_super_adapter")
    assert not clear_adapter_metadata(plain)
    plain.save_pretrained(tmp_path / "b")
    assert "shears_super_adapter" not in json.loads((tmp_path / "b" / "config.json").read_text())
    with pytest.raises(ValueError, match="no shears super-adapter"):
        load_adapter(make_tiny("llama"), tmp_path / "b")


def test_load_adapter_refuses_a_checkpoint_without_adapter_weights(tmp_path):
    model = adapt(make_tiny("llama"), "llama")
    model.save_pretrained(tmp_path / "a")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "a")  # config keeps the metadata
    plain.save_pretrained(tmp_path / "b")  # ... but no adapter weights
    fresh = make_tiny("llama")
    with pytest.raises(ValueError, match="lora_A"):
        load_adapter(fresh, tmp_path / "b")
    assert not list(elastic_modules(fresh))  # nothing attached


def test_save_adapter_format_unchanged_beside_save_pretrained(tmp_path):
    model = adapt(make_tiny("llama"), "llama")
    set_config(model, maximal_config(model))
    save_adapter(model, tmp_path)
    model.save_pretrained(tmp_path)  # both formats in one directory
    a = load_adapter(make_tiny("llama"), tmp_path)  # the save_adapter files win
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.weight" in f.keys()
    assert torch.equal(logits(a), logits(model))


# ---- Trainer: save_model, checkpoints, resume, load_best_model_at_end -------------------


def nls_trainer(out, model, data, **kw):
    from transformers import TrainingArguments

    from shears.training import NLSTrainer

    args = dict(output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-2,
                report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                dataloader_num_workers=0, save_strategy="steps", save_steps=3, max_steps=6)
    return NLSTrainer(model=model, args=TrainingArguments(**{**args, **kw}),
                      train_dataset=data, eval_dataset=data[:4], nls_seed=3)


def token_data(n=24):
    return [{"input_ids": x, "labels": x.clone()} for x in random_ids(n, 16, seed=4)]


def checkpoint_keys(directory):
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_trainer_save_model_and_checkpoints_keep_the_base(tmp_path):
    model, base = pruned("llama")
    adapt(model, "llama")
    trainer = nls_trainer(tmp_path / "run", model, token_data())
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoint-3"
    keys = checkpoint_keys(ckpt)
    assert not [k for k in keys if "base_layer" in k] and lora_keys(model) <= keys
    assert_base_equal(AutoModelForCausalLM.from_pretrained(ckpt), base)

    trainer.save_model(str(tmp_path / "final"))
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "final",
                                                       output_loading_info=True)
    assert info["missing_keys"] == set()
    assert_base_equal(plain, base)
    load_adapter(plain, tmp_path / "final")
    assert get_config(plain) == get_config(model)  # the last training step's sub-adapter
    heuristic = trainer.eval_config
    assert torch.equal(logits(plain, heuristic), logits(model, heuristic))


def test_resume_from_new_format_checkpoint_restores_base_and_adapters(tmp_path):
    data = token_data()
    full_model, base = pruned("llama")
    full = nls_trainer(tmp_path / "full", adapt(full_model, "llama"), data, weight_decay=0.05)
    full.train()
    # Resume into a model whose base is NOT the pruned one: the checkpoint must restore it
    # (a key the load missed would leave the unpruned weight in place).
    other = adapt(make_tiny("llama", seed=1), "llama")
    resumed = nls_trainer(tmp_path / "resumed", other, data, weight_decay=0.05)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert [r["config"] for r in resumed.nls_history.records] == [
        r["config"] for r in full.nls_history.records]
    full_state, resumed_state = full_model.state_dict(), other.state_dict()
    assert set(full_state) == set(resumed_state)
    for k, v in full_state.items():
        if "lora_" in k:
            torch.testing.assert_close(resumed_state[k], v, rtol=0, atol=1e-6, msg=k)
        else:
            assert torch.equal(resumed_state[k], base[k]), k


def test_load_best_model_at_end(tmp_path):
    model, base = pruned("llama")
    adapt(model, "llama")
    # "Best" = highest eval loss, so that the checkpoint loaded at the end (step 3) is not the
    # state the model is already in (step 6).
    trainer = nls_trainer(tmp_path, model, token_data(), eval_strategy="steps", eval_steps=3,
                          load_best_model_at_end=True, metric_for_best_model="loss",
                          greater_is_better=True)
    full_run_lora_b = None

    def keep_last(*_, **__):
        nonlocal full_run_lora_b
        full_run_lora_b = model.model.layers[0].self_attn.q_proj.lora_B.detach().clone()

    from transformers import TrainerCallback

    trainer.add_callback(type("Last", (TrainerCallback,), {"on_step_end": keep_last})())
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-3"), best  # not the last one
    with safe_open(str(tmp_path / best.rsplit("/", 1)[-1] / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    state = model.state_dict()
    for k, v in state.items():
        assert torch.equal(v, saved[k] if k in saved else base[k]), k
    assert {k for k in saved if "lora_A" in k} == {k for k in state if "lora_A" in k}
    q = "model.layers.0.self_attn.q_proj.lora_B"
    assert not torch.equal(saved[q], full_run_lora_b)  # step 3 differs from step 6


def test_single_layer_keys_and_buffers_of_the_adapter_itself():
    from torch import nn

    from shears.adapters import ElasticLoRALinear

    torch.manual_seed(0)
    layer = ElasticLoRALinear(nn.Linear(16, 12), ranks=[4, 2])
    layer.register_buffer("rank_mask", torch.ones(4))  # a buffer of the adapter, not the base
    layer.active_rank = 2
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "lora_A", "lora_B", "lora_active_rank", "rank_mask"}
    assert state["lora_active_rank"].dtype == torch.int64 and int(state["lora_active_rank"]) == 2
    plain = nn.Linear(16, 12)
    plain.load_state_dict({k: state[k] for k in ("weight", "bias")})
    assert torch.equal(plain.weight, layer.base_layer.weight)
    twin = ElasticLoRALinear(nn.Linear(16, 12), ranks=[4, 2])
    twin.register_buffer("rank_mask", torch.zeros(4))
    twin.load_state_dict(state, strict=True)
    assert twin.active_rank == 2 and torch.equal(twin.rank_mask, layer.rank_mask)
    assert torch.equal(twin.base_layer.bias, layer.base_layer.bias)
    x = torch.randn(3, 16)
    assert torch.equal(twin(x), layer(x))


def test_adapters_on_a_submodule_round_trip_through_save_pretrained(tmp_path):
    """add_elastic_lora(model.model): the layout names modules relative to model.model,
    the weights file relative to the whole model (issue 12, 2c)."""
    model, _ = pruned("llama")
    add_elastic_lora(model.model, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
                     ranks=[8, 4, 2], groups="qkv")
    randomize_adapters(model, seed=7)
    active = random_config(model, 5)
    expected = logits(model, active)
    model.save_pretrained(tmp_path)
    plain = load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path), tmp_path)
    assert get_config(plain) == active
    assert torch.equal(logits(plain), expected)
    sub = AutoModelForCausalLM.from_pretrained(tmp_path)
    load_adapter(sub.model, tmp_path)  # onto the same submodule
    assert torch.equal(logits(sub), expected)
