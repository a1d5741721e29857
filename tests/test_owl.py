"""Per-map / per-block sparsity and OWL, against computations written out independently."""

import json

import numpy as np
import pytest
import torch
import transformers as T
from tiny import _GQA, VOCAB, random_ids
from torch import nn
from transformers import TrainingArguments

from shears import (
    add_elastic_lora,
    export_compressed,
    export_peft,
    merge_adapters,
    sparsity_report,
    wanda_prune,
)
from shears.adapters import heuristic_config
from shears.pruning.owl import owl_allocation
from shears.quantization import quantize_base
from shears.training import NLSTrainer


def llama(layers=4, seed=0):
    config = T.LlamaConfig(**dict(_GQA, num_hidden_layers=layers), vocab_size=VOCAB)
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(config).eval()


def maps_of(model):
    """Qualified name -> (out, in) weight of every linear map of the decoder blocks."""
    return {n: m.weight.data for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in n}


def block_of(name):
    return int(name.split(".layers.")[1].split(".")[0])


def zero_masks(model):
    return {n: w == 0 for n, w in maps_of(model).items()}


def dense_statistics(model, rows):
    """Per map, mean over sequences of sum_tokens x^2 in float64, from whole-model forwards
    of the *dense* model, one row at a time (what OWL measures D_l on)."""
    modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and ".layers." in n}
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in modules.items()}

    def hook(name):
        def accumulate(module, args):
            x = args[0].double()
            sums[name].add_((x.reshape(-1, x.shape[-1]) ** 2).sum(0))
        return accumulate

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    with torch.no_grad():
        for row in rows:
            model(input_ids=row[None])
    for h in handles:
        h.remove()
    return {n: s / len(rows) for n, s in sums.items()}


def hand_ratios(model, rows, threshold, magnitude=False):
    """D_l: share of the block's scores (all its maps together) above M times their mean."""
    stats = None if magnitude else dense_statistics(model, rows)
    scores: dict[int, list[np.ndarray]] = {}
    for name, w in maps_of(model).items():
        s = w.double().abs() if magnitude else w.double().abs() * stats[name].sqrt()
        scores.setdefault(block_of(name), []).append(s.numpy().ravel())
    out = {}
    for block, parts in scores.items():
        flat = np.concatenate(parts)
        out[block] = float((flat > threshold * flat.mean()).mean())
    return out


def luuyin_owl(ratios, sparsity, lam):
    """luuyin/OWL lib/prune_all.py (prune_wanda_outlier), written out: layer sparsities."""
    r = np.array(ratios)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    r = r - np.mean(r) + (1 - sparsity)
    return 1 - r


# ---- the allocation ----
def test_allocation_is_luuyin_owl_when_nothing_clips():
    ratios = [0.01, 0.02, 0.03, 0.015, 0.025]  # symmetric around the mid-range: no clipping
    ours = owl_allocation(dict(enumerate(ratios)), dict.fromkeys(range(5), 100), 0.7, 0.08)
    np.testing.assert_allclose([ours[i] for i in range(5)], luuyin_owl(ratios, 0.7, 0.08),
                               atol=1e-12)
    assert ours[0] == pytest.approx(0.78) and ours[2] == pytest.approx(0.62)


def test_allocation_clips_and_keeps_the_mean():
    # OWL would give [S + 2l/3, S + 2l/3, S - 4l/3]: the last is clipped to S - l, and the
    # others take the rest: 2a + (S - l) = 3S, a = S + l/2
    ours = owl_allocation({0: 0.0, 1: 0.0, 2: 1.0}, dict.fromkeys(range(3), 10), 0.6, 0.1)
    assert ours[2] == pytest.approx(0.5, abs=1e-12)
    assert ours[0] == pytest.approx(0.65, abs=1e-12) == ours[1]


@pytest.mark.parametrize("seed", range(20))
def test_parameter_weighted_mean_is_exactly_the_target(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    ratios = dict(enumerate(rng.exponential(0.01, n) ** rng.uniform(0.5, 3)))
    params = dict(enumerate(int(p) for p in rng.integers(1, 10**7, n)))
    s, lam = float(rng.uniform(0.05, 0.85)), float(rng.uniform(0.0, 0.14))
    out = owl_allocation(ratios, params, s, lam)
    mean = sum(out[i] * params[i] for i in out) / sum(params.values())
    assert abs(mean - s) < 1e-9
    assert all(max(0, s - lam) - 1e-12 <= v <= s + lam + 1e-12 for v in out.values())
    # more outliers, never more sparsity
    order = sorted(out, key=lambda i: ratios[i])
    assert all(out[a] >= out[b] - 1e-12 for a, b in zip(order, order[1:], strict=False))


def test_equal_ratios_or_no_lambda_give_the_target_exactly():
    assert owl_allocation({0: 0.2, 1: 0.2}, {0: 5, 1: 7}, 0.5, 0.08) == {0: 0.5, 1: 0.5}
    assert owl_allocation({0: 0.1, 1: 0.3}, {0: 5, 1: 7}, 0.5, 0.0) == {0: 0.5, 1: 0.5}


# ---- OWL in wanda_prune ----
@pytest.mark.parametrize("threshold", [5.0, 2.0])
def test_outlier_ratios_match_a_hand_computation(threshold):
    calib = random_ids(6, 24)
    model = llama()
    expected = hand_ratios(llama(), calib, threshold)
    report = wanda_prune(model, calib, 0.6, allocation="owl", owl_rows=None,
                         owl_threshold=threshold,
                         owl_lambda=0.1, batch_size=2, progress=False)
    assert report.outlier_ratios.keys() == expected.keys()
    for block, d in expected.items():
        assert report.outlier_ratios[block] == pytest.approx(d, abs=2e-4)  # a score at M·mean
    params = dict.fromkeys(expected, sum(w.numel() for n, w in maps_of(model).items()
                                         if block_of(n) == 0))
    assert report.allocation == pytest.approx(owl_allocation(expected, params, 0.6, 0.1))
    assert len(set(report.allocation.values())) > 1  # a test that can tell uniform apart


def test_owl_masks_are_wanda_with_the_allocation_and_the_mean_is_exact():
    calib = random_ids(6, 24)
    owl = llama()
    # block 1 loses its MLP from the selection: blocks of unequal size, a weighted mean
    report = wanda_prune(owl, calib, 0.55, allocation="owl", exclude=r"layers\.1\.mlp",
                         progress=False)
    sizes = {}
    for m in report.modules:
        sizes[block_of(m.name)] = sizes.get(block_of(m.name), 0) + m.numel
    mean = sum(report.allocation[b] * n for b, n in sizes.items()) / sum(sizes.values())
    assert abs(mean - 0.55) < 1e-9
    # the allocation is a plain mapping: passed back as sparsity=, the same masks (and the
    # same through JSON, whose keys are strings)
    for mapping in (report.allocation, {str(k): v for k, v in report.allocation.items()}):
        again = llama()
        wanda_prune(again, calib, mapping, exclude=r"layers\.1\.mlp", progress=False)
        assert all(torch.equal(a, zero_masks(again)[n]) for n, a in zero_masks(owl).items())
    # each map got its block's sparsity, row by row
    for m in report.modules:
        assert m.target == report.allocation[block_of(m.name)]
        w = maps_of(owl)[m.name]
        assert ((w == 0).sum(1) == int(w.shape[1] * m.target)).all()
    assert report.to_dict()["allocation"] == report.allocation


def test_owl_rows_auto_is_an_eighth_of_the_rows():
    calib = random_ids(17, 8)
    auto = wanda_prune(llama(), calib, 0.5, allocation="owl", progress=False)
    three = wanda_prune(llama(), calib, 0.5, allocation="owl", owl_rows=3, progress=False)
    every = wanda_prune(llama(), calib, 0.5, allocation="owl", owl_rows=None, progress=False)
    assert auto.outlier_ratios == three.outlier_ratios  # ceil(17 / 8) = 3
    assert auto.outlier_ratios != every.outlier_ratios


def test_owl_rows_uses_the_first_rows():
    calib = random_ids(8, 24)
    report = wanda_prune(llama(), calib, 0.5, allocation="owl", owl_rows=3, progress=False)
    expected = hand_ratios(llama(), calib[:3], 5.0)
    assert report.outlier_ratios == pytest.approx(expected, abs=2e-4)


def test_magnitude_owl_and_magnitude_mapping():
    model = llama()
    report = wanda_prune(model, None, 0.5, method="magnitude", allocation="owl",
                         owl_threshold=3.0, progress=False)
    assert report.outlier_ratios == pytest.approx(hand_ratios(llama(), None, 3.0, True),
                                                  abs=1e-9)
    again = llama()
    wanda_prune(again, None, report.allocation, method="magnitude", progress=False)
    assert all(torch.equal(a, zero_masks(again)[n]) for n, a in zero_masks(model).items())


def test_sequential_false_and_offload_give_the_same_allocation():
    calib = random_ids(4, 16)
    a = wanda_prune(llama(), calib, 0.5, allocation="owl", progress=False)
    b = wanda_prune(llama(), calib, 0.5, allocation="owl", sequential=False, progress=False)
    c = wanda_prune(llama(), calib, 0.5, allocation="owl", offload_device="cpu",
                    progress=False)
    assert a.allocation == b.allocation == c.allocation


# ---- a sparsity per map or per block ----
def test_mapping_by_name_and_block():
    calib = random_ids(4, 16)
    model = llama(layers=2)
    names = list(maps_of(model))
    mapping = {0: 0.3, **{n: 0.1 * (i % 7) for i, n in enumerate(names) if block_of(n) == 1}}
    report = wanda_prune(model, calib, mapping, progress=False)
    assert report.allocation is None  # block 1's maps differ: no per-block mapping
    for m in report.modules:
        want = 0.3 if block_of(m.name) == 0 else mapping[m.name]
        assert m.target == want
        w = maps_of(model)[m.name]
        assert ((w == 0).sum(1) == int(w.shape[1] * want)).all()
    # a uniform mapping is the float
    a, b = llama(layers=2), llama(layers=2)
    wanda_prune(a, calib, {0: 0.5, 1: 0.5}, progress=False)
    wanda_prune(b, calib, 0.5, progress=False)
    assert all(torch.equal(x, zero_masks(b)[n]) for n, x in zero_masks(a).items())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sparsity={0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5}), ValueError, "no decoder block 4"),
    (dict(sparsity={0: 0.5, 1: 0.5, 2: 0.5}), ValueError, "leaves 7 selected maps"),
    (dict(sparsity={0: 0.5, 1: 0.5, 2: 0.5, 3: 1.0}), ValueError, r"\[3\].*\[0, 1\)"),
    (dict(sparsity={0: 0.5, 1: 0.5, 2: 0.5, 3: -0.1}), ValueError, r"\[0, 1\)"),
    (dict(sparsity={0: 0.5, 1: 0.5, 2: 0.5, 3: "0.5"}), TypeError, "number"),
    (dict(sparsity={0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5, "model.layers.0.mlp.up_proj": 0.2}),
     ValueError, "twice"),
    (dict(sparsity={0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5, "model.layers.0.mlp.nope": 0.2}),
     ValueError, "not a map to be pruned"),
    (dict(sparsity={0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5}, pattern="2:4"), ValueError,
     "unstructured"),
    (dict(sparsity=0.5, pattern="2:4", allocation="owl"), ValueError, "N:M"),
    (dict(pattern="2:4", allocation="owl"), ValueError, "N:M"),
    (dict(sparsity={0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5}, allocation="owl"), ValueError, "float"),
    (dict(sparsity=0.5, allocation="owl", owl_lambda=0.6), ValueError, "below 1"),
    (dict(sparsity=0.5, allocation="owl", owl_lambda=-0.1), ValueError, "owl_lambda"),
    (dict(sparsity=0.5, allocation="owl", owl_threshold=float("nan")), ValueError,
     "owl_threshold"),
    (dict(sparsity=0.5, allocation="owl", owl_rows=0), ValueError, "owl_rows"),
    (dict(sparsity=0.5, allocation="outliers"), ValueError, "'uniform' or 'owl'"),
    (dict(sparsity={0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5}, exclude=r"layers\.3\."), ValueError,
     "block 3 has no map"),
])
def test_refusals_change_nothing(kwargs, error, match):
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        wanda_prune(model, random_ids(2, 8), progress=False, **kwargs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---- downstream: INT4 grid, NLS, merge, exports, report ----
def nls_steps(model, tmp_path, steps=2):
    data = [{"input_ids": x, "labels": x.clone()} for x in random_ids(8, 16, seed=3)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2,
                             max_steps=steps, learning_rate=1e-2, report_to="none",
                             use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                             dataloader_num_workers=0)
    NLSTrainer(model=model, args=args, train_dataset=data).train()


TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def test_owl_base_through_quantize_nls_merge_compressed_export_and_report(tmp_path):
    model = llama()
    report = wanda_prune(model, random_ids(6, 24), 0.6, allocation="owl", owl_lambda=0.1,
                         progress=False)
    pruned = zero_masks(model)
    quantize_base(model, bits=4, group_size=32)
    assert all(torch.equal(pruned[n], m) for n, m in zero_masks(model).items())
    add_elastic_lora(model, TARGETS, ranks=[8, 4], sparse_adapter=True)
    nls_steps(model, tmp_path)
    merge_adapters(model, heuristic_config(model))
    after = sparsity_report(model)
    for row in after.modules:  # every pruned zero survives the merge on the grid
        assert not maps_of(model)[row.name][pruned[row.name]].any()
    assert after.sparsity >= report.sparsity
    assert [(m.name, m.zeros) for m in sparsity_report(model, [m.name for m in report.modules])
            .modules] == [(r.name, r.zeros) for r in after.modules
                          if r.name in {m.name for m in report.modules}]
    export_compressed(model, tmp_path / "int4")
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "int4").eval()
    ids = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    for name, zeros in pruned.items():
        assert not reloaded.get_submodule(name).weight[zeros].any()


def test_owl_base_with_plain_adapters_exports_to_peft(tmp_path):
    model = llama()
    wanda_prune(model, random_ids(6, 24), 0.6, allocation="owl", progress=False)
    add_elastic_lora(model, TARGETS, ranks=[8, 4])
    nls_steps(model, tmp_path)
    export_peft(model, tmp_path / "peft", heuristic_config(model))
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists()


# ---- examples/reproduce.py --allocation ----
class _CharTokenizer:
    """Token id = byte value mod the tiny vocabulary: enough for calibration_data."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = torch.tensor([b % VOCAB for b in text.encode()])[None]
        return type("Encoding", (), {"input_ids": ids})()


def test_reproduce_prunes_with_owl(tmp_path):
    import reproduce

    args = reproduce.parse_args(["--allocation", "owl", "--owl-lambda", "0.1", "--owl-rows",
                                 "2", "--sparsity", "0.6", "--calibration", "train",
                                 "--nsamples", "4", "--calib-seqlen", "16"])
    records = [{"instruction": "add the numbers " * 4, "output": "the answer is 7 " * 4}] * 8
    summary = reproduce.prune(llama(), _CharTokenizer(), args, tmp_path, records, tmp_path)
    assert summary["outlier_ratios"] and len(set(summary["allocation"].values())) > 1
    assert abs(sum(summary["allocation"].values()) / 4 - 0.6) < 1e-9
    saved = json.loads((tmp_path / "pruning.json").read_text())
    assert saved["allocation"] == {str(k): v for k, v in summary["allocation"].items()}
