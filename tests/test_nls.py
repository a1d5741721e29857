"""NLSTrainer: one sub-adapter per optimizer step, reproducible, resumable, base untouched."""

import re

import numpy as np
import pytest
import torch
from tiny import make_tiny, random_ids
from transformers import TrainingArguments

from shears.adapters import add_elastic_lora, get_config, heuristic_config, search_space
from shears.training import NLSTrainer, sandwich_sampler

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def dataset(n=32, seqlen=16, seed=0):
    ids = random_ids(n, seqlen, seed)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=6,
                learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no",
                disable_tqdm=True, logging_steps=2, seed=0, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def adapted(seed=0, **kw):
    return add_elastic_lora(make_tiny("llama", seed), TARGETS, ranks=[16, 8, 4], **kw)


def trainer_for(tmp_path, model=None, data=None, **kw):
    nls = {k: kw.pop(k) for k in ("nls_sampler", "nls_seed", "eval_config", "nls_sample_every")
           if k in kw}
    return NLSTrainer(model=model if model is not None else adapted(), args=args(tmp_path, **kw),
                      train_dataset=data or dataset(), **nls)


def adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_pruned_base_untouched_after_20_steps_with_weight_decay(tmp_path):
    from shears.pruning import wanda_prune

    model = make_tiny("llama")
    wanda_prune(model, random_ids(4, 32, seed=1), sparsity=0.5, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    zeros = {n: w == 0 for n, w in before.items() if w.dim() == 2 and "layers" in n}
    assert zeros and all(0.45 < z.float().mean() < 0.55 for z in zeros.values())
    add_elastic_lora(model, TARGETS, ranks=[16, 8, 4])
    lora0 = adapter_state(model)
    trainer = trainer_for(tmp_path, model, max_steps=20, weight_decay=0.1)
    trainer.train()
    after = {re.sub(r"\.base_layer", "", n): p for n, p in model.named_parameters()
             if "lora_" not in n}
    assert set(after) == set(before)
    for n, w in after.items():
        assert torch.equal(w, before[n]), n  # bitwise unchanged, zeros included
        if n in zeros:
            assert torch.all(w[zeros[n]] == 0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora0) and len(trainable) == 20
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for n, p in model.named_parameters() if "lora_" in n}
    moved = [n for n, p in adapter_state(model).items() if not torch.equal(p, lora0[n])]
    assert len(moved) == 20  # every adapter trained (A by weight decay at least, B by grads)
    assert len(trainer.nls_history) == 20


def test_config_constant_within_step_including_checkpoint_recompute(tmp_path):
    model = adapted()
    seen = []  # (global_step, config) at every call of the first attention block
    trainer = trainer_for(tmp_path, model, gradient_accumulation_steps=4, max_steps=4,
                          gradient_checkpointing=True)
    # A hook inside the decoder block: the checkpoint recomputes the block's `forward`.
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda *_: seen.append((trainer.state.global_step, tuple(get_config(model).values()))))
    trainer.train()
    by_step = {}
    for step, cfg in seen:
        by_step.setdefault(step, []).append(cfg)
    assert sorted(by_step) == list(range(4))
    for step, cfgs in by_step.items():
        assert len(cfgs) == 8, step  # 4 micro-batches, each forward + recomputation in backward
        assert len(set(cfgs)) == 1, step
    assert len({cfgs[0] for cfgs in by_step.values()}) > 1  # varies across steps
    assert [tuple(r["config"].values()) for r in trainer.nls_history.records] == [
        by_step[s][0] for s in range(4)]


def test_same_seed_same_sequence_and_uniform_ranks(tmp_path):
    def draws(seed):
        t = trainer_for(tmp_path, nls_seed=seed, max_steps=8)
        t.train()
        return [r["config"] for r in t.nls_history.records]

    a, b, c = draws(3), draws(3), draws(4)
    assert a == b and a != c
    # Independent recomputation: the uniform sampler is one numpy generator, groups in order.
    rng = np.random.default_rng(3)
    space = search_space(adapted())
    expected = [{g: r[rng.integers(len(r))] for g, r in space.items()} for _ in range(8)]
    assert a == expected


def test_resume_reproduces_uninterrupted_run(tmp_path):
    data = dataset(48)
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3, gradient_accumulation_steps=2,
              weight_decay=0.05, nls_seed=11)
    full = trainer_for(tmp_path / "full", adapted(), data, **kw)
    full.train()
    resumed = trainer_for(tmp_path / "resumed", adapted(), data, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert [r["config"] for r in resumed.nls_history.records] == [
        r["config"] for r in full.nls_history.records]
    assert len(resumed.nls_history) == 6
    a, b = adapter_state(full.model), adapter_state(resumed.model)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6, msg=n)


def test_evaluate_and_predict_use_eval_config_then_restore(tmp_path):
    model = adapted()
    data = dataset(8)
    trainer = trainer_for(tmp_path, model, data, eval_config="minimal")
    seen = []
    model.model.layers[0].register_forward_pre_hook(
        lambda *_: seen.append(set(get_config(model).values())))
    training_cfg = {g: 8 for g in search_space(model)}
    from shears.adapters import set_config

    set_config(model, training_cfg)
    metrics = trainer.evaluate(eval_dataset=data)
    assert "eval_loss" in metrics and seen and all(s == {4} for s in seen)
    assert get_config(model) == training_cfg
    seen.clear()
    trainer.predict(data[:2])
    assert seen and all(s == {4} for s in seen)
    assert trainer_for(tmp_path, adapted()).eval_config == heuristic_config(model)


def test_sandwich_callable_sampler_and_logs(tmp_path):
    t = trainer_for(tmp_path, nls_sampler="sandwich", max_steps=6)
    t.train()
    ranks = [set(r["config"].values()) for r in t.nls_history.records]
    assert ranks[0] == {16} and ranks[1] == {4} and ranks[3] == {16} and ranks[4] == {4}
    assert sandwich_sampler({"g": [2, 1]}, np.random.default_rng(0), 7) == {"g": 1}
    logs = [e for e in t.state.log_history if "loss" in e]
    assert logs and all("nls_mean_rank" in e and "nls_freq_r16" in e for e in logs)
    first = t.nls_history.records[:2]  # logging_steps=2: the first log covers steps 0 and 1
    assert logs[0]["nls_mean_rank"] == pytest.approx(np.mean(
        [r for rec in first for r in rec["config"].values()]))

    steps = []

    def only_first_group(space, rng, step):
        steps.append(step)
        return {next(iter(space)): 4}  # partial: other groups keep their rank

    t = trainer_for(tmp_path, nls_sampler=only_first_group, max_steps=3)
    t.train()
    assert steps == [0, 1, 2]
    cfg = t.nls_history.records[-1]["config"]
    assert list(cfg.values())[0] == 4 and set(list(cfg.values())[1:]) == {16}


def test_history_statistics(tmp_path):
    t = trainer_for(tmp_path, max_steps=6)
    t.train()
    h = t.nls_history
    counts = h.rank_counts()
    assert all(sum(c.values()) == 6 for c in counts.values())
    g = next(iter(counts))
    for rank, mean in h.mean_loss_by_rank()[g].items():
        losses = [r["loss"] for r in h.records if r["config"][g] == rank]
        assert mean == pytest.approx(sum(losses) / len(losses))
    assert sum(n for _, _, n in h.mean_loss_by_config()) == 6
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in h.records)


def test_bf16_autocast_over_fp32_adapters(tmp_path):
    model = adapted()
    lora0 = adapter_state(model)
    t = trainer_for(tmp_path, model, bf16=True, max_steps=3)
    t.train()
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    assert all(np.isfinite(r["loss"]) for r in t.nls_history.records)
    assert any(not torch.equal(p, lora0[n]) for n, p in adapter_state(model).items())


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="add_elastic_lora"):
        trainer_for(tmp_path, make_tiny("llama"))
    with pytest.raises(ValueError, match="sampler"):
        trainer_for(tmp_path, nls_sampler="greedy")
    with pytest.raises(ValueError, match="eval_config"):
        trainer_for(tmp_path, eval_config="median")
    with pytest.raises(ValueError, match="lacks"):
        trainer_for(tmp_path, eval_config={"model.layers.0.self_attn.q_proj": 8})
