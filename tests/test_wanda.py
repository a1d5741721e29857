"""wanda_prune on tiny models of several families, against independent recomputations."""

import pytest
import torch
from tiny import FAMILIES, make_tiny, random_ids
from torch import nn
from transformers.pytorch_utils import Conv1D

from shears import sparsity_report, wanda_prune
from shears.pruning.layers import find_decoder_blocks


def linears_of(block, prefix):
    return {f"{prefix}.{n}": m for n, m in block.named_modules()
            if isinstance(m, (nn.Linear, Conv1D))}


def as_out_in(module):
    return module.weight.data.t() if isinstance(module, Conv1D) else module.weight.data


def reference_wanda(model, rows, sparsity, sequential=True):
    """The algorithm written out plainly: for each block, run the *whole* model on every
    calibration row (one at a time) with hooks on that block's maps, then prune the block.
    Blocks already pruned feed the next through the full forward (sequential), or every
    statistic is collected from the dense model first (not sequential)."""
    prefix, blocks = find_decoder_blocks(model)
    maps = [linears_of(b, f"{prefix}.{i}") for i, b in enumerate(blocks)]

    def statistics(selected):
        sums = {n: torch.zeros(as_out_in(m).shape[1], dtype=torch.float64) for n, m in
                selected.items()}

        def hook(name):
            def accumulate(module, args):  # returns None: the input is left as it is
                x = args[0].double()
                sums[name].add_((x.reshape(-1, x.shape[-1]) ** 2).sum(0))  # OPT passes 2-D
            return accumulate

        hooks = [m.register_forward_pre_hook(hook(n)) for n, m in selected.items()]
        with torch.no_grad():
            for row in rows:
                model(input_ids=row[None])
        for h in hooks:
            h.remove()
        return {n: s / len(rows) for n, s in sums.items()}

    def prune(selected, stats):
        for n, m in selected.items():
            w = as_out_in(m)
            score = w.abs().double() * stats[n].sqrt()
            k = int(w.shape[1] * sparsity)
            idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
            w.scatter_(1, idx, 0.0)

    if sequential:
        for selected in maps:
            prune(selected, statistics(selected))
    else:
        everything = {n: m for sel in maps for n, m in sel.items()}
        stats = statistics(everything)
        prune(everything, stats)


def masks(model):
    prefix, blocks = find_decoder_blocks(model)
    out = {}
    for i, b in enumerate(blocks):
        out.update({n: as_out_in(m) == 0 for n, m in linears_of(b, f"{prefix}.{i}").items()})
    return out


def agreement(a, b):
    same = sum(int((a[n] == b[n]).sum()) for n in a)
    return same / sum(a[n].numel() for n in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_matches_plain_recomputation(family):
    calib = random_ids(6, 24)
    ours, ref = make_tiny(family), make_tiny(family)
    wanda_prune(ours, calib, 0.5, batch_size=4, progress=False)
    reference_wanda(ref, calib, 0.5)
    assert agreement(masks(ours), masks(ref)) >= 0.999


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_pass_matches_dense_statistics(family):
    calib = random_ids(6, 24)
    ours, ref = make_tiny(family), make_tiny(family)
    wanda_prune(ours, calib, 0.5, sequential=False, progress=False)
    reference_wanda(ref, calib, 0.5, sequential=False)
    assert agreement(masks(ours), masks(ref)) >= 0.999
    # and it differs from the sequential result somewhere (the test can tell them apart)
    seq = make_tiny(family)
    wanda_prune(seq, calib, 0.5, progress=False)
    assert agreement(masks(ours), masks(seq)) < 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_row_counts_and_untouched_rest(family):
    model = make_tiny(family)
    before = {n: p.clone() for n, p in model.named_parameters()}
    report = wanda_prune(model, random_ids(4, 16), 0.3, progress=False)
    pruned = {m.name for m in report.modules}
    named = dict(model.named_modules())
    for name in pruned:
        w = as_out_in(named[name])
        assert ((w == 0).sum(1) >= int(w.shape[1] * 0.3)).all()
        # exactly k zeroed by the mask: zeros already present in the weight cannot occur
        assert ((w == 0).sum(1) == int(w.shape[1] * 0.3)).all()
    for n, p in model.named_parameters():
        owner = n.rsplit(".", 1)[0]
        if owner not in pruned:  # embeddings, norms, lm_head, biases' own modules
            assert torch.equal(p, before[n]), n
        elif n.endswith("bias"):
            assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_nm_pattern(pattern, n, m):
    model = make_tiny("llama")
    report = wanda_prune(model, random_ids(4, 16), pattern=pattern, progress=False)
    assert report.sparsity == pytest.approx(n / m)
    for name, zeros in masks(model).items():
        blocks = zeros.reshape(zeros.shape[0], -1, m)
        assert (blocks.sum(-1) == n).all(), name


def test_targets_and_exclude():
    model = make_tiny("llama")
    report = wanda_prune(model, random_ids(4, 16), targets=[r"mlp\."], exclude="down_proj",
                         progress=False)
    assert {m.name.split(".")[-1] for m in report.modules} == {"gate_proj", "up_proj"}
    for name, zeros in masks(model).items():
        assert zeros.any() == (("gate_proj" in name) or ("up_proj" in name)), name


def test_deterministic_and_batch_size_independent():
    calib = random_ids(8, 32)
    a, b, c = make_tiny("qwen2"), make_tiny("qwen2"), make_tiny("qwen2")
    wanda_prune(a, calib, progress=False)
    wanda_prune(b, calib, progress=False)
    wanda_prune(c, calib, batch_size=8, progress=False)
    assert agreement(masks(a), masks(b)) == 1.0
    assert agreement(masks(a), masks(c)) >= 0.999


def test_offload_to_same_device_gives_identical_masks():
    calib = random_ids(6, 16)
    a, b = make_tiny("mistral"), make_tiny("mistral")
    wanda_prune(a, calib, progress=False)
    wanda_prune(b, calib, offload_device="cpu", progress=False)
    assert agreement(masks(a), masks(b)) == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_to_cuda_matches_cpu():
    calib = random_ids(6, 16)
    a, b = make_tiny("llama"), make_tiny("llama")
    wanda_prune(a, calib, progress=False)
    wanda_prune(b, calib, offload_device="cuda", progress=False)
    assert next(b.parameters()).device.type == "cpu"
    assert agreement(masks(a), masks(b)) >= 0.999


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    model = make_tiny("llama", dtype=dtype)
    report = wanda_prune(model, random_ids(4, 16), progress=False)
    assert report.sparsity == pytest.approx(0.5)
    assert all(p.dtype == dtype for p in model.parameters())
    ref = make_tiny("llama")  # fp32 statistics of the same weights agree closely
    wanda_prune(ref, random_ids(4, 16), progress=False)
    assert agreement(masks(model), masks(ref)) >= 0.95


def test_padded_rows_ignore_padding():
    # rows of unequal length: padding must not enter the statistics, so the result equals
    # one-pass statistics taken from each row alone
    rows = [random_ids(1, 20, seed=1)[0], random_ids(1, 12, seed=2)[0], random_ids(1, 16, 3)[0]]
    ours, ref = make_tiny("llama"), make_tiny("llama")
    wanda_prune(ours, [{"input_ids": r} for r in rows], sequential=False, batch_size=3,
                progress=False)
    reference_wanda(ref, rows, 0.5, sequential=False)
    assert agreement(masks(ours), masks(ref)) >= 0.999


def test_dataloader_of_dicts():
    calib = random_ids(6, 16)
    loader = torch.utils.data.DataLoader([{"input_ids": r} for r in calib], batch_size=4)
    a, b = make_tiny("opt"), make_tiny("opt")
    wanda_prune(a, loader, progress=False)
    wanda_prune(b, calib, progress=False)
    assert agreement(masks(a), masks(b)) == 1.0


def test_report_counts_match_the_weights():
    model = make_tiny("gpt2")
    wanda_prune(model, random_ids(4, 16), 0.25, progress=False)
    report = sparsity_report(model)
    named = dict(model.named_modules())
    for row in report.modules:
        w = as_out_in(named[row.name])
        assert row.shape == tuple(w.shape)
        assert row.zeros == int((w == 0).sum())
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    assert (report.total_parameters, report.nonzero_parameters) == (total, nonzero)
    d = report.to_dict()
    assert d["sparsity"] == pytest.approx(0.25) and len(d["modules"]) == 8
    assert "overall sparsity 25.00%" in str(report)
