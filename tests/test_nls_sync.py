"""NLSTrainer adds no host synchronisation per step: losses stay on the device until read."""

import sys
from pathlib import Path

import pytest
import torch
from test_nls import adapted, dataset, trainer_for
from transformers import TrainerCallback

import shears

SHEARS_DIR = str(Path(shears.__file__).resolve().parent)
# Every way Python code turns a tensor into a host value (each one waits for the device).
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def count_host_reads_from_shears(monkeypatch) -> dict[str, int]:
    """Patch the tensor -> host conversions; count those whose immediate caller is shears."""
    counts = dict.fromkeys(HOST_READS, 0)
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, _name=name, _original=original, **kw):
            if sys._getframe(1).f_code.co_filename.startswith(SHEARS_DIR):
                counts[_name] += 1
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return counts


def test_the_counter_sees_calls_from_shears_only(monkeypatch):
    counts = count_host_reads_from_shears(monkeypatch)
    t = torch.tensor([1.5])
    t.item(), float(t), bool(t)  # from the tests: not counted
    assert sum(counts.values()) == 0
    code = compile("loss.item()", str(Path(SHEARS_DIR) / "fake.py"), "eval")
    eval(code, {"loss": t})  # a frame whose file lies inside shears/: counted
    assert counts["item"] == 1


@pytest.mark.parametrize("accumulation,every", [(1, "step"), (2, "step"), (2, "micro_batch")])
def test_host_reads_do_not_grow_with_steps(tmp_path, monkeypatch, accumulation, every):
    """The issue's criterion: logging off, N = 3 and N = 9 steps, same count from shears."""
    def reads(steps):
        trainer = trainer_for(tmp_path, max_steps=steps, logging_strategy="no",
                              gradient_accumulation_steps=accumulation, nls_sample_every=every)
        with monkeypatch.context() as m:
            counts = count_host_reads_from_shears(m)
            trainer.train()
        records = steps * (accumulation if every == "micro_batch" else 1)
        assert len(trainer.nls_history) == records  # read after the patch: not counted
        return counts

    few, many = reads(3), reads(9)
    assert few == many, (few, many)
    assert sum(many.values()) == 0  # records are completed when the history is read


def test_recorded_losses_are_the_steps_logged_losses(tmp_path):
    """An independent witness of the lazily completed records: with logging every step, the
    Trainer logs each step's loss (summed over micro-batches), computed by its own code."""
    t = trainer_for(tmp_path, max_steps=5, logging_steps=1, gradient_accumulation_steps=2)
    t.train()
    logged = [e["loss"] for e in t.state.log_history if "loss" in e]
    recorded = [r["loss"] for r in t.nls_history.records]
    assert len(logged) == 5 and all(isinstance(x, float) for x in recorded)
    assert recorded == pytest.approx(logged, rel=1e-6)
    assert [r["step"] for r in t.nls_history.records] == list(range(5))


def test_history_read_during_training_is_complete(tmp_path):
    """Reading ``nls_history`` mid-training (logging off) completes the pending records."""
    seen = []

    class Reader(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            h = trainer.nls_history
            seen.append((state.global_step, len(h), [r["step"] for r in h.records]))

    trainer = trainer_for(tmp_path, adapted(), dataset(), max_steps=4, logging_strategy="no")
    trainer.add_callback(Reader())
    trainer.train()
    assert seen == [(s, s, list(range(s))) for s in range(1, 5)]
    assert all(r["loss"] > 0 for r in trainer.nls_history.records)


def shares(records):
    """Share of each rank among all group draws of ``records`` (written here, independently)."""
    ranks = [r for rec in records for r in rec["config"].values()]
    return {r: ranks.count(r) / len(ranks) for r in set(ranks)}


def test_rank_frequencies_in_logs_cover_the_whole_history_across_resume(tmp_path):
    kw = dict(max_steps=6, logging_steps=2, save_strategy="steps", save_steps=3, nls_seed=5)
    full = trainer_for(tmp_path / "full", adapted(), dataset(48), **kw)
    full.train()
    resumed = trainer_for(tmp_path / "resumed", adapted(), dataset(48), **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for t in (full, resumed):  # the resumed log history starts with the checkpoint's
        logs = [e for e in t.state.log_history if "nls_freq_r16" in e]
        assert [e["step"] for e in logs] == [2, 4, 6]
        for e in logs:
            expected = shares(t.nls_history.records[: e["step"]])
            got = {int(k.removeprefix("nls_freq_r")): v for k, v in e.items()
                   if k.startswith("nls_freq_r")}
            assert got == pytest.approx(expected), e["step"]
