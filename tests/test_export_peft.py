"""export_peft: a sub-adapter as a stock PEFT LoRA adapter, checked by loading it with PEFT."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from export_models import logits, pruned_adapted, same_state, state
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from shears import export_peft
from shears.adapters import (
    elastic_modules,
    get_config,
    maximal_config,
    minimal_config,
    random_config,
    search_space,
    set_config,
)
from shears.export.peft_lora import pattern_key, target_modules_field

ROOT = Path(__file__).resolve().parents[1]


def distinct_config(model, seed):
    """A random configuration in which blocks 1 and 11 (if present) take different ranks."""
    config = random_config(model, seed)
    space = search_space(model)
    for g in config:
        if re.search(r"\.11\.self_attn", g):
            g1 = g.replace(".11.", ".1.")
            config[g] = next(r for r in space[g] if r != config[g1])
    return config


def peft_reload(base, directory):
    return PeftModel.from_pretrained(base, str(directory)).eval()


# Llama with 12 blocks, so that block 1's keys could hit block 11 if matching were by suffix.
CASES = [("llama", 12), ("qwen2", None), ("gpt2", None)]


@pytest.mark.parametrize("family,layers", CASES)
def test_stock_peft_reload_matches_the_sub_adapter(tmp_path, family, layers):
    base, model = pruned_adapted(family, layers=layers)
    config = distinct_config(model, seed=3)
    set_config(model, config)
    expected, plain = logits(model), logits(base)
    assert (expected - plain).abs().max() > 1e-2  # the adapters do matter
    out = export_peft(model, tmp_path / "sub", base_model_name_or_path="tiny/base")
    assert out == tmp_path / "sub"

    peft_model = peft_reload(base, out)
    ranks = {name: config[m.group] for name, m in elastic_modules(model)}
    for name, m in elastic_modules(model):  # PEFT made each module at its own rank ...
        lora = peft_model.base_model.model.get_submodule(name)
        assert lora.r["default"] == ranks[name]
        assert lora.lora_A["default"].weight.shape == (ranks[name], m.in_features)
        assert lora.scaling["default"] == pytest.approx(m.alpha / m.r_max)  # ... scaling kept
    assert (logits(peft_model) - expected).abs().max() <= 1e-5
    merged = peft_model.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (logits(merged) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("family,layers", CASES)
def test_files_follow_the_peft_format(tmp_path, family, layers):
    _, model = pruned_adapted(family, layers=layers)
    config = distinct_config(model, seed=4)
    set_config(model, config)
    export_peft(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    modules = dict(elastic_modules(model))
    alpha, r_max = 32.0, 16
    assert meta["peft_type"] == "LORA" and meta["task_type"] == "CAUSAL_LM"
    assert meta["r"] == r_max and meta["lora_alpha"] == alpha
    assert meta["fan_in_fan_out"] is (family == "gpt2")
    assert meta["bias"] == "none" and meta["use_rslora"] is False
    assert meta["use_dora"] is False and meta["modules_to_save"] is None
    assert meta["init_lora_weights"] is True and meta["lora_dropout"] == 0.0
    assert sorted(meta["target_modules"]) == sorted(modules)
    rank_of = {name: config[m.group] for name, m in modules.items()}
    assert meta["rank_pattern"] == {pattern_key(n): r for n, r in rank_of.items()}
    for name, r in rank_of.items():
        assert meta["alpha_pattern"][pattern_key(name)] == pytest.approx(alpha * r / r_max)

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(modules)
    for name, m in modules.items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        r = rank_of[name]
        assert a.is_contiguous() and b.is_contiguous() and a.dtype == b.dtype == torch.float32
        assert torch.equal(a, m.lora_A.detach()[:r]) and torch.equal(b, m.lora_B.detach()[:, :r])
    # every key picks out exactly its own module, as PEFT matches them
    names = [n for n, _ in model.named_modules()]
    for name in modules:
        hits = [n for n in names if get_pattern_key([pattern_key(name)], n) == pattern_key(name)]
        assert hits == [name]


def test_minimal_config_exported_while_another_is_active(tmp_path):
    base, model = pruned_adapted("llama")
    set_config(model, maximal_config(model))
    export_peft(model, tmp_path, config=minimal_config(model))
    assert get_config(model) == maximal_config(model)  # the active config is left alone
    peft_model = peft_reload(base, tmp_path)
    set_config(model, minimal_config(model))
    assert (logits(peft_model) - logits(model)).abs().max() <= 1e-5


def test_partial_config_fills_from_the_active_one(tmp_path):
    base, model = pruned_adapted("llama")
    active = random_config(model, 8)
    set_config(model, active)
    group = next(iter(active))
    other = next(r for r in search_space(model)[group] if r != active[group])
    export_peft(model, tmp_path, config={group: other})
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    for name, m in elastic_modules(model):
        want = other if m.group == group else active[m.group]
        assert meta["rank_pattern"][pattern_key(name)] == want
    assert get_config(model) == active
    set_config(model, {group: other})
    assert (logits(peft_reload(base, tmp_path)) - logits(model)).abs().max() <= 1e-5


def test_refusals_write_nothing_and_leave_the_model_alone(tmp_path):
    _, sparse = pruned_adapted("llama", sparse_adapter=True)
    before = state(sparse)
    with pytest.raises(ValueError, match="merge_adapters"):
        export_peft(sparse, tmp_path / "a")
    assert same_state(sparse, before) and not (tmp_path / "a").exists()

    _, model = pruned_adapted("llama")
    before, active = state(model), get_config(model)
    with pytest.raises(KeyError, match="nope"):
        export_peft(model, tmp_path / "b", config={"nope": 4})
    group = next(iter(active))
    with pytest.raises(ValueError, match="not in"):
        export_peft(model, tmp_path / "c", config={group: 5})
    assert same_state(model, before) and get_config(model) == active
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="no elastic"):
        export_peft(nn.Sequential(nn.Linear(4, 4)), tmp_path / "d")


def test_base_model_name_defaults_to_the_models_own(tmp_path):
    _, model = pruned_adapted("llama")
    model.name_or_path = "org/pruned-model"  # as from_pretrained("org/pruned-model") sets it
    export_peft(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == "org/pruned-model"


class Suffixes(nn.Module):
    """``fc`` is a suffix of ``block.fc``: target names must not select each other."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.block = nn.Module()
        self.block.fc = nn.Linear(8, 8)
        self.block.conv = Conv1D(8, 8)


def test_target_modules_select_exactly_the_adapted_modules():
    model = Suffixes()
    names = [n for n, _ in model.named_modules()]
    for targets in (["fc"], ["block.fc"], ["fc", "block.conv"], ["block.fc", "block.conv"]):
        field = target_modules_field(targets, names)
        config = LoraConfig(target_modules=field)
        chosen = [n for n in names if n and check_target_module_exists(config, n)]
        assert sorted(chosen) == sorted(targets), (targets, field)
    # without a clash the field stays a readable list of names
    assert target_modules_field(["block.fc", "block.conv"], names) == ["block.fc", "block.conv"]


def test_export_works_without_peft(tmp_path):
    """peft is a test dependency only: with ``import peft`` failing, export still works."""
    code = (
        "import sys\n"
        "sys.modules['peft'] = None  # any `import peft` now raises ImportError\n"
        "from torch import nn\n"
        "from shears import add_elastic_lora, export_peft\n"
        "m = add_elastic_lora(nn.Sequential(nn.Linear(8, 8)), ['0'], ranks=[4, 2])\n"
        f"export_peft(m, {str(tmp_path)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert (tmp_path / "adapter_model.safetensors").is_file()
