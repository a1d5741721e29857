"""Every writer of shears, SIGKILLed at its worst moments over an earlier complete save: the
next load gives the earlier state exactly, or refuses with an error naming the folder. Never
the new half of one file with the old half of another (issue 17, section 5, 6, 8).

Each case forks a child from a preloaded forkserver (``crash.py``), which builds the new
state and writes it until the kill point; the parent built the old state the same way."""

import copy
import json
import re

import pytest
import torch
import transformers as T
from crash import on_call, on_replace, run_killed
from export_models import logits, pruned_adapted
from peft import PeftModel
from tiny import make_tiny

import shears
from shears.adapters import elastic_modules
from shears.atomic import TMP_PREFIX, read_json
from shears.evaluation.generation import EvalResult
from shears.export import (
    CONFIG_NAME,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    WEIGHTS_NAME,
    export_peft,
    load_adapter,
    save_adapter,
)

pytest.importorskip("compressed_tensors")


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(TMP_PREFIX))


def refused(directory, load, error=(ValueError, OSError), match=None):
    """``load()`` raises an error naming ``directory`` (and ``match``)."""
    with pytest.raises(error) as info:
        load()
    assert str(directory) in str(info.value)
    if match:
        assert re.search(match, str(info.value)), info.value


# ---- save_adapter / load_adapter ----------------------------------------------------------


def write_adapter(directory, seed):
    _, model = pruned_adapted(seed=seed)
    save_adapter(model, directory)


ADAPTER_KILLS = {  # kill point -> what the next load_adapter must do
    "staged, nothing moved": (on_call("shears.export.saving:save_file", before=False), "old"),
    "old JSON removed": (on_replace(WEIGHTS_NAME, before=True), "refused"),
    "new weights in, JSON not": (on_replace(WEIGHTS_NAME, before=False), "refused"),
    "JSON complete, not renamed": (on_replace(CONFIG_NAME, before=True), "refused"),
}


@pytest.mark.parametrize("case", list(ADAPTER_KILLS))
def test_save_adapter_killed(tmp_path, case):
    point, outcome = ADAPTER_KILLS[case]
    d = tmp_path / "adapter"
    write_adapter(d, seed=0)
    run_killed(write_adapter, d, 1, kill_at=point)
    base, old = pruned_adapted(seed=0)
    if outcome == "old":
        load_adapter(base, d)
        assert torch.equal(logits(base), logits(old))
    else:
        refused(d, lambda: load_adapter(base, d), match="interrupted")
        assert not list(elastic_modules(base))  # nothing attached
    write_adapter(d, seed=1)  # the next save completes and clears what the kill left
    assert sorted(p.name for p in d.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    base, new = pruned_adapted(seed=1)
    assert torch.equal(logits(load_adapter(base, d)), logits(new))


def test_load_adapter_refuses_new_weights_under_an_old_json(tmp_path):
    """What a writer without the ordering (shears before issue 17) left after a kill."""
    write_adapter(tmp_path / "old", seed=0)
    write_adapter(tmp_path / "new", seed=1)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (tmp_path / "new" / WEIGHTS_NAME).replace(mixed / WEIGHTS_NAME)
    (tmp_path / "old" / CONFIG_NAME).replace(mixed / CONFIG_NAME)
    base, _ = pruned_adapted(seed=0)
    refused(mixed, lambda: load_adapter(base, mixed), match="two different saves")


def test_truncated_files_are_named(tmp_path):
    write_adapter(tmp_path, seed=0)
    weights = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    base, _ = pruned_adapted(seed=0)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / WEIGHTS_NAME)) + ".*truncated"):
        load_adapter(base, tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"format": "shears-super-adapter", "tar')
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / CONFIG_NAME)) + ".*truncated"):
        load_adapter(base, tmp_path)


# ---- export_peft (judged by stock PEFT) ---------------------------------------------------


def write_peft(directory, seed):
    _, model = pruned_adapted(seed=seed)
    export_peft(model, directory)


PEFT_KILLS = {
    "staged, nothing moved": (on_call("shears.export.peft_lora:save_file", before=False), "old"),
    "new weights in, config not": (on_replace(PEFT_WEIGHTS_NAME, before=False), "refused"),
    "config complete, not renamed": (on_replace(PEFT_CONFIG_NAME, before=True), "refused"),
}


@pytest.mark.parametrize("case", list(PEFT_KILLS))
def test_export_peft_killed(tmp_path, case):
    point, outcome = PEFT_KILLS[case]
    d = tmp_path / "peft"
    write_peft(d, seed=0)
    run_killed(write_peft, d, 1, kill_at=point)
    base, old = pruned_adapted(seed=0)
    if outcome == "old":
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(d)).eval()
        assert (logits(reloaded) - logits(old)).abs().max() <= 1e-5
    else:
        refused(d, lambda: PeftModel.from_pretrained(copy.deepcopy(base), str(d)),
                match=PEFT_CONFIG_NAME)
    write_peft(d, seed=1)
    assert leftovers(d) == []
    base, new = pruned_adapted(seed=1)
    reloaded = PeftModel.from_pretrained(base, str(d)).eval()
    assert (logits(reloaded) - logits(new)).abs().max() <= 1e-5


# ---- export_compressed (judged by transformers + compressed-tensors) -----------------------


def quantized(seed):
    model = make_tiny("llama", seed=seed)
    shears.wanda_prune(model, method="magnitude", sparsity=0.5, progress=False)
    shears.quantize_base(model, group_size=32)
    return model


def write_compressed(directory, seed):
    shears.export_compressed(quantized(seed), directory)


UPDATE_CONFIG = ("compressed_tensors.compressors.model_compressors.model_compressor:"
                 "ModelCompressor.update_config")
COMPRESSED_KILLS = {
    # where the old export_compressed left packed weights under a dense config.json
    "weights saved, config not updated": (on_call(UPDATE_CONFIG, before=True), "old"),
    # the first rename onto config.json puts the placeholder over the old one
    "placeholder not renamed": (on_replace("config.json", before=True), "old"),
    "placeholder in": (on_replace("config.json", before=False), "refused"),
    "new weights in, config not": (on_replace("model.safetensors", before=False), "refused"),
    "config complete, not renamed": (on_replace("config.json", before=True, nth=2), "refused"),
}


@pytest.mark.parametrize("case", list(COMPRESSED_KILLS))
def test_export_compressed_killed_over_a_sharded_dense_save(tmp_path, case):
    point, outcome = COMPRESSED_KILLS[case]
    d = tmp_path / "ckpt"
    old = quantized(0)
    old.save_pretrained(d, max_shard_size="100KB")  # dense, sharded: shards and an index
    run_killed(write_compressed, d, 1, kill_at=point)
    if outcome == "old":
        again = T.AutoModelForCausalLM.from_pretrained(d)
        assert torch.equal(logits(again), logits(old))
    else:
        # a class loader would take a default LlamaConfig (7B) if config.json were missing
        for loader in (T.AutoModelForCausalLM, T.LlamaForCausalLM):
            refused(d, lambda loader=loader: loader.from_pretrained(d), OSError, "config.json")
        assert "interrupted" in (d / "config.json").read_text()
    write_compressed(d, seed=1)
    names = sorted(p.name for p in d.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors"], names
    assert torch.equal(logits(T.AutoModelForCausalLM.from_pretrained(d)), logits(quantized(1)))


# ---- save_pretrained of an adapted model (transformers writes; shears' layout ties it) ------


def write_pretrained(directory, seed):
    _, model = pruned_adapted(seed=seed)
    model.save_pretrained(directory)


def test_save_pretrained_killed_between_config_and_weights(tmp_path):
    d = tmp_path / "pretrained"
    write_pretrained(d, seed=0)
    # transformers writes config.json (the new layout and digest), then the weights
    run_killed(write_pretrained, d, 1,
               kill_at=on_call("transformers.modeling_utils:safe_save_file", before=True))
    assert read_json(d / "config.json")["shears_super_adapter"]["adapter_digest"]
    base, _ = pruned_adapted(seed=0)
    refused(d, lambda: load_adapter(base, d), match="two different saves")
    write_pretrained(d, seed=1)
    base, new = pruned_adapted(seed=1)
    assert torch.equal(logits(load_adapter(base, d)), logits(new))


# ---- single files: the NLS sampler state, an evaluation result ------------------------------


def write_nls_state(directory, seed):
    from test_nls import adapted, dataset
    from transformers import TrainingArguments

    from shears.training import NLSTrainer

    args = TrainingArguments(output_dir=str(directory), report_to="none", use_cpu=True,
                             disable_tqdm=True)
    trainer = NLSTrainer(model=adapted(), args=args, train_dataset=dataset(4), nls_seed=seed)
    trainer.nls_rng.integers(0, 10, size=seed)  # a state that differs with the seed
    trainer._save_rng_state(str(directory))


def test_nls_state_killed_before_rename_keeps_the_previous_file(tmp_path):
    write_nls_state(tmp_path, seed=0)
    before = (tmp_path / "nls_state.json").read_text()
    run_killed(write_nls_state, tmp_path, 3, kill_at=on_replace("nls_state.json"))
    assert (tmp_path / "nls_state.json").read_text() == before
    assert json.loads(before)["nls_seed"] == 0
    (tmp_path / "nls_state.json").write_text(before[:40])  # as a plain write could leave it
    from test_nls import adapted, dataset

    from shears.training import NLSTrainer
    args = T.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = NLSTrainer(model=adapted(), args=args, train_dataset=dataset(4))
    with pytest.raises(ValueError, match="nls_state.json.*truncated"):
        trainer._load_rng_state(str(tmp_path))


def write_eval_result(path, accuracy):
    EvalResult("gsm8k", accuracy, [{"prompt": "p", "output": "1", "prediction": 1.0,
                                    "label": 1.0, "correct": True}] * 200).save(path)


def test_eval_result_killed_before_rename_keeps_the_previous_file(tmp_path):
    path = tmp_path / "eval.json"
    write_eval_result(path, 0.25)
    run_killed(write_eval_result, path, 0.75, kill_at=on_replace("eval.json"))
    assert json.loads(path.read_text())["accuracy"] == 0.25



def train_with_checkpoints(output_dir):
    from test_nls import trainer_for

    trainer_for(output_dir, max_steps=4, save_strategy="steps", save_steps=2, nls_seed=5).train()


def test_trainer_killed_while_checkpointing_refuses_to_resume_from_that_checkpoint(tmp_path):
    # the second checkpoint's nls_state.json: after the weights, before trainer_state.json
    run_killed(train_with_checkpoints, tmp_path, kill_at=on_replace("nls_state.json", nth=2))
    last = tmp_path / "checkpoint-4"
    assert not (last / "nls_state.json").exists()
    from test_nls import trainer_for

    with pytest.raises(FileNotFoundError, match=re.escape(str(last / "trainer_state.json"))):
        trainer_for(tmp_path, max_steps=4, nls_seed=5).train(resume_from_checkpoint=str(last))
    resumed = trainer_for(tmp_path / "again", max_steps=4, nls_seed=5)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))  # the previous one
    assert len(resumed.nls_history) == 4
