"""NLSTrainer(nls_sample_every="micro_batch"): a new sub-adapter at every micro-batch.

Against a hand-counted schedule: every micro-batch of gradient accumulation draws the next
``random_config`` from one seeded numpy generator, and its forward (and the gradient-
checkpoint recomputation inside its backward) runs that configuration.
"""

import json

import numpy as np
import pytest
import torch
from test_nls import adapted, adapter_state, dataset, trainer_for

from shears.adapters import elastic_modules, random_config, search_space
from shears.training import NLS_STATE_NAME


def active_ranks(model) -> tuple[int, ...]:
    """Every adapter's active rank, read off the modules (not through shears' config code)."""
    return tuple(m.active_rank for _, m in elastic_modules(model))


def expected_draws(model, seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    space = search_space(model)
    return [random_config(space, rng) for _ in range(n)]


def as_ranks(model, config: dict) -> tuple[int, ...]:
    """A config (group -> rank) as the per-adapter rank tuple ``active_ranks`` reads."""
    index = {name: group for group, names in _groups(model).items() for name in names}
    return tuple(config[index[name]] for name, _ in elastic_modules(model))


def _groups(model) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, m in elastic_modules(model):
        groups.setdefault(m.group if m.group is not None else name, []).append(name)
    return groups


def test_twelve_micro_batches_draw_twelve_consecutive_configs(tmp_path):
    """gradient_accumulation_steps=4, 3 optimizer steps: 12 draws, each seen by its own
    micro-batch's forward and by the checkpoint recomputation in its backward."""
    model = adapted()
    top, block = [], []  # active ranks at every model forward / first attention call
    model.register_forward_pre_hook(lambda *_: top.append(active_ranks(model)))
    # Inside the decoder block: the checkpoint recomputes the block's `forward`.
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda *_: block.append(active_ranks(model)))
    trainer = trainer_for(tmp_path, model, nls_seed=3, gradient_accumulation_steps=4,
                          max_steps=3, gradient_checkpointing=True,
                          nls_sample_every="micro_batch")
    trainer.train()
    expected = [as_ranks(model, c) for c in expected_draws(model, 3, 12)]
    assert len(set(expected)) > 3  # the check can tell draws apart
    assert top == expected
    assert block == [r for r in expected for _ in range(2)]  # forward, then recomputation
    records = trainer.nls_history.records
    assert [r["step"] for r in records] == [0] * 4 + [1] * 4 + [2] * 4
    assert [r["micro_batch"] for r in records] == list(range(12))
    assert [r["config"] for r in records] == expected_draws(model, 3, 12)


def test_step_mode_keeps_one_draw_per_step_and_its_records(tmp_path):
    model = adapted()
    top = []
    model.register_forward_pre_hook(lambda *_: top.append(active_ranks(model)))
    trainer = trainer_for(tmp_path, model, nls_seed=3, gradient_accumulation_steps=4,
                          max_steps=3)
    trainer.train()
    expected = [as_ranks(model, c) for c in expected_draws(model, 3, 3)]
    assert top == [r for r in expected for _ in range(4)]
    assert [set(r) for r in trainer.nls_history.records] == [{"step", "config", "loss"}] * 3


def test_records_average_to_the_logged_step_loss_with_a_partial_window(tmp_path):
    """20 sequences in micro-batches of 2, accumulation 4: windows of 4, 4 and 2 micro-batches.
    The mean of a step's records is the loss Trainer logs for that step (its own code)."""
    trainer = trainer_for(tmp_path, adapted(), dataset(20), gradient_accumulation_steps=4,
                          num_train_epochs=1, max_steps=-1, logging_steps=1,
                          nls_sample_every="micro_batch")
    trainer.train()
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    records = trainer.nls_history.records
    steps = [r["step"] for r in records]
    assert steps == [0] * 4 + [1] * 4 + [2] * 2
    means = [np.mean([r["loss"] for r in records if r["step"] == s]) for s in range(3)]
    assert means == pytest.approx(logged, rel=1e-5)
    # The statistics average over micro-batches.
    group = next(iter(search_space(trainer.model)))
    for rank, mean in trainer.nls_history.mean_loss_by_rank()[group].items():
        own = [r["loss"] for r in records if r["config"][group] == rank]
        assert mean == pytest.approx(sum(own) / len(own))
    assert sum(c for _, _, c in trainer.nls_history.mean_loss_by_config()) == 10


def test_resume_after_a_partial_window_continues_the_sequence(tmp_path):
    """Two epochs of windows 4, 4, 2; the checkpoint after step 4 has consumed 14 draws,
    not 16. The resumed run draws what the uninterrupted one drew, and ends with its weights."""
    data = dataset(20)
    kw = dict(gradient_accumulation_steps=4, max_steps=6, save_strategy="steps", save_steps=2,
              weight_decay=0.05, nls_seed=11, nls_sample_every="micro_batch")
    full = trainer_for(tmp_path / "full", adapted(), data, **kw)
    full.train()
    records = full.nls_history.records
    assert [r["config"] for r in records] == expected_draws(full.model, 11, 20)  # 4+4+2 twice
    state = json.loads((tmp_path / "full" / "checkpoint-4" / NLS_STATE_NAME).read_text())
    assert state["micro_batches"] == 14 and len(state["history"]["records"]) == 14
    resumed = trainer_for(tmp_path / "resumed", adapted(), data, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert [(r["step"], r["micro_batch"], r["config"]) for r in resumed.nls_history.records] \
        == [(r["step"], r["micro_batch"], r["config"]) for r in records]
    a, b = adapter_state(full.model), adapter_state(resumed.model)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6, msg=n)


def test_sandwich_rotates_over_micro_batches(tmp_path):
    trainer = trainer_for(tmp_path, nls_sampler="sandwich", gradient_accumulation_steps=2,
                          max_steps=3, nls_sample_every="micro_batch")
    trainer.train()
    ranks = [set(r["config"].values()) for r in trainer.nls_history.records]
    assert len(ranks) == 6 and ranks[0] == ranks[3] == {16} and ranks[1] == ranks[4] == {4}


def test_mode_errors(tmp_path):
    with pytest.raises(ValueError, match="nls_sample_every"):
        trainer_for(tmp_path, nls_sample_every="epoch")
    kw = dict(max_steps=2, save_strategy="steps", save_steps=1)
    trainer_for(tmp_path / "a", adapted(), dataset(8), **kw).train()
    other = trainer_for(tmp_path / "b", adapted(), dataset(8), nls_sample_every="micro_batch",
                        **kw)
    with pytest.raises(ValueError, match="nls_sample_every='step'"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
