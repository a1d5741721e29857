"""NLSTrainer under torch.compile: one graph for every configuration, the eager run's result.

The backend is ``aot_eager`` (dynamo + AOTAutograd, no code generation): it traces forward
and backward as inductor would and is what specialises a sliced rank's shapes, but runs in
seconds. Inductor figures are in benchmarks/bench_compile.py and docs/training.md.
"""

import pytest
import torch
import torch._dynamo
from tiny import make_tiny, random_ids
from torch._dynamo.utils import counters
from transformers import TrainingArguments

from shears.adapters import add_elastic_lora, elastic_modules
from shears.training import NLSTrainer

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def dataset(n, seqlen=16):
    return [{"input_ids": x, "labels": x.clone()} for x in random_ids(n, seqlen)]


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=6,
                learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no",
                disable_tqdm=True, logging_steps=1000, seed=0, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    counters.clear()


def nls_run(tmp_path, rank_mode, steps, **kw):
    model = add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[16, 8, 4], rank_mode=rank_mode)
    trainer = NLSTrainer(model=model, train_dataset=dataset(2 * steps),
                         args=args(tmp_path, max_steps=steps, **kw))
    trainer.train()
    return trainer


def test_compiled_nls_keeps_one_graph_and_matches_eager(tmp_path, fresh_dynamo):
    steps = 30
    eager = nls_run(tmp_path / "eager", "slice", steps)
    compiled = nls_run(tmp_path / "compiled", "mask", steps, torch_compile=True,
                       torch_compile_backend="aot_eager")
    configs = [r["config"] for r in compiled.nls_history.records]
    assert configs == [r["config"] for r in eager.nls_history.records]
    assert len({tuple(c.values()) for c in configs}) == steps  # a new configuration each step
    # One frame converted once: no recompilation, no graph break, no eager fallback.
    assert fresh_dynamo["stats"]["unique_graphs"] == 1
    assert fresh_dynamo["frames"]["total"] == 1 and not fresh_dynamo["graph_break"]
    a, b = adapter_state(eager.model), adapter_state(compiled.model)
    # The compiled graph sums in another order; Adam (lr 1e-2) turns those fp32 rounding
    # differences into update differences: up to 1.8e-5 after 30 steps with transformers 5.24
    # (1e-5 held with earlier versions). A wrong rank or mask moves entries by ~lr = 1e-2.
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-4, msg=n)
    losses = [(r["loss"], s["loss"]) for r, s in zip(eager.nls_history.records,
                                                     compiled.nls_history.records, strict=True)]
    assert all(abs(x - y) <= 1e-4 for x, y in losses)


def test_trainer_switches_sliced_adapters_to_masks_under_compile(tmp_path):
    model = add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[16, 8, 4])
    with pytest.warns(UserWarning, match="rank_mode='mask'"):
        NLSTrainer(model=model, args=args(tmp_path, torch_compile=True,
                                          torch_compile_backend="aot_eager"),
                   train_dataset=dataset(4))
    assert {m.rank_mode for _, m in elastic_modules(model)} == {"mask"}
    user_compiled = add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[16, 8, 4])
    user_compiled.model.layers[0].compile(backend="aot_eager")  # regional, in place
    with pytest.warns(UserWarning, match="10 elastic adapters"):
        NLSTrainer(model=user_compiled, args=args(tmp_path), train_dataset=dataset(4))
    assert {m.rank_mode for _, m in elastic_modules(user_compiled)} == {"mask"}
    plain = add_elastic_lora(make_tiny("llama"), TARGETS, ranks=[16, 8, 4])
    NLSTrainer(model=plain, args=args(tmp_path), train_dataset=dataset(4))
    assert {m.rank_mode for _, m in elastic_modules(plain)} == {"slice"}  # eager: untouched
