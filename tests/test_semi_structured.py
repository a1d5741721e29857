"""to_semi_structured: the checks on CPU (pure functions), the conversion itself on CUDA."""

import copy

import pytest
import torch
from export_models import TARGETS, paper_groups, same_state, state
from tiny import make_tiny, random_ids
from torch import nn

from shears import add_elastic_lora, merge_adapters, to_semi_structured, wanda_prune
from shears.export import (
    check_semi_structured,
    semi_structured_backend,
    semi_structured_problems,
    two_four_violations,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def two_four(rows, cols, dtype=torch.bfloat16, seed=0):
    """A random (rows, cols) weight with exactly 2 non-zeros in each group of 4 inputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    keep = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1) < 2
    return (w * keep.reshape(rows, cols)).to(dtype)


def pruned_24(family="llama", dtype=torch.bfloat16):
    model = make_tiny(family)
    wanda_prune(model, random_ids(4, 16, seed=7), pattern="2:4", progress=False)
    return model.to(dtype)


def count_violations_by_hand(w):
    n = 0
    for row in w.tolist():
        for j in range(0, len(row), 4):
            n += sum(v != 0 for v in row[j : j + 4]) > 2
    return n


def test_two_four_violations_counts_groups():
    w = two_four(8, 16, torch.float32)
    assert two_four_violations(w) == 0
    w[0, 0:4] = 1.0  # 4 non-zeros in one group
    w[3, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # 3 in another
    w[5, 12:16] = torch.tensor([0.0, 0.0, 0.0, 7.0])  # 1: fine
    assert two_four_violations(w) == count_violations_by_hand(w) == 2
    dense = torch.randn(16, 32)
    assert two_four_violations(dense) == count_violations_by_hand(dense) == 16 * 8
    with pytest.raises(ValueError, match="multiple of 4"):
        two_four_violations(torch.zeros(4, 6))


def test_kernel_shape_constraints_of_both_backends():
    # torch 2.13: cuSPARSELt fp16/bf16 needs (16, 16), CUTLASS (32, 64), at least and multiples
    cases = {
        (32, 64): (True, True),
        (16, 16): (True, False),
        (48, 64): (True, False),  # 48 rows: a multiple of 16, not of 32
        (32, 80): (True, False),  # 80 inputs: a multiple of 16, not of 64
        (8, 64): (False, False),
        (32, 72): (False, False),
        (64, 128): (True, True),
        (11008, 4096): (True, True),  # Llama-2-7B's up/gate projection
        (4096, 11008): (True, True),  # and its down projection (11008 = 172 * 64)
    }
    for shape, (ok_cusparselt, ok_cutlass) in cases.items():
        w = {"m": two_four(*shape)} if shape[0] * shape[1] < 10**6 else \
            {"m": torch.zeros(shape, dtype=torch.bfloat16)}
        assert (semi_structured_problems(w, "cusparselt") == []) == ok_cusparselt, shape
        assert (semi_structured_problems(w, "cutlass") == []) == ok_cutlass, shape
    with pytest.raises(ValueError, match="backend"):
        semi_structured_problems({}, "triton")


def test_every_problem_of_every_map_is_listed():
    bad_pattern = two_four(32, 64)
    bad_pattern[2, 4:8] = 1
    bad_pattern[9, 60:64] = 1
    weights = {
        "good": two_four(32, 64),
        "not_2_4": bad_pattern,
        "fp32": two_four(32, 64, torch.float32),
        "small": two_four(8, 16),
        "odd": torch.zeros(32, 70, dtype=torch.bfloat16),
        "dense_and_misshapen": torch.randn(40, 64).to(torch.float16),
    }
    problems = semi_structured_problems(weights, "cusparselt")
    by_map = {name: [p for p in problems if p.startswith(name + ":")] for name in weights}
    assert by_map["good"] == []
    assert len(by_map["not_2_4"]) == 1 and "2 of 512 groups" in by_map["not_2_4"][0]
    assert len(by_map["fp32"]) == 1 and "float32" in by_map["fp32"][0]
    assert len(by_map["small"]) == 1 and "(out=8, in=16)" in by_map["small"][0]
    assert len(by_map["odd"]) == 1 and "(out=32, in=70)" in by_map["odd"][0]
    assert len(by_map["dense_and_misshapen"]) == 2
    assert f"{count_violations_by_hand(weights['dense_and_misshapen'])} of 640 groups" in \
        by_map["dense_and_misshapen"][1]
    assert len(problems) == 6


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_check_on_a_pruned_model(family):
    model = pruned_24(family)
    assert check_semi_structured(model) == []
    assert check_semi_structured(model, backend="cutlass") == []
    unstructured = make_tiny(family).to(torch.bfloat16)
    wanda_prune(unstructured, random_ids(4, 16, seed=7), 0.5, progress=False)
    problems = check_semi_structured(unstructured)
    assert len(problems) == (8 if family == "gpt2" else 14)  # every map of both blocks
    assert all("not 2:4" in p for p in problems)
    with pytest.raises(KeyError, match="lm_head.x"):
        check_semi_structured(model, ["lm_head.x"])


def test_adapters_dense_kept_sparse_refused():
    model = pruned_24()
    add_elastic_lora(model, TARGETS["llama"], ranks=[8, 4], groups=paper_groups("llama"))
    assert check_semi_structured(model) == []  # base layers converted, adapters kept aside
    sparse = pruned_24()
    add_elastic_lora(sparse, ["q_proj", "up_proj"], ranks=[8, 4], sparse_adapter=True)
    problems = check_semi_structured(sparse)
    assert len(problems) == 4 and all("merge_adapters" in p for p in problems)
    merge_adapters(sparse)
    assert check_semi_structured(sparse) == []  # the sparse merge keeps 2:4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a CPU machine")
def test_cpu_is_refused_clearly_and_nothing_changes():
    model = pruned_24()
    before = state(model)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        to_semi_structured(model)
    assert same_state(model, before)


@cuda
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cuda_output_matches_dense_within_bf16_tolerance(family):
    dense = pruned_24(family).cuda()
    sparse = to_semi_structured(copy.deepcopy(dense), progress=False)
    converted = [n for n, p in sparse.named_parameters()
                 if isinstance(p, torch.sparse.SparseSemiStructuredTensor)]
    assert len(converted) == (8 if family == "gpt2" else 14)
    ids = random_ids(2, 19).cuda()  # 38 tokens: not a multiple of the kernel's tile
    with torch.no_grad():
        expected, got = dense(ids).logits.float(), sparse(ids).logits.float()
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


@cuda
def test_cuda_with_unmerged_adapters_and_errors():
    model = pruned_24().cuda()
    add_elastic_lora(model, TARGETS["llama"], ranks=[8, 4])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    ids = random_ids(2, 8).cuda()
    with torch.no_grad():
        expected = model(ids).logits.float()
        got = to_semi_structured(model, progress=False)(ids).logits.float()
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert semi_structured_backend() in ("cusparselt", "cutlass")
    with pytest.raises(ValueError, match="not 2:4"):
        to_semi_structured(make_tiny("llama").to(torch.bfloat16).cuda(), progress=False)
    with pytest.raises(RuntimeError, match="model.cuda"):
        to_semi_structured(pruned_24(), progress=False)
    small = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(KeyError):
        to_semi_structured(small.cuda(), ["1"])
