"""Masks and scores against hand-computed answers."""

import pytest
import torch
from torch import nn

from shears import wanda_prune
from shears.pruning.masks import nm_mask, parse_pattern, unstructured_mask, zero_masked_


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4, bias=False)

    def forward(self, x, **kwargs):
        return self.proj(x)


class ToyLM(nn.Module):
    """Embedding -> one linear block, so the activations are known exactly."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(3, 4)
        self.blocks = nn.ModuleList([ToyBlock()])
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor([[1.0, 0, 2, 0], [0, 1, 0, 3], [1, 1, 1, 1]]))
            self.blocks[0].proj.weight.copy_(torch.tensor([
                [1.2, 1.0, 0.9, 0.8],
                [1.0, 1.0, 1.0, 1.0],
                [0.5, 2.0, -1.0, 0.6],
                [1.0, 1.0, 0.9, 0.5],
            ]))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return h


def test_wanda_mask_matches_hand_computation():
    # sequences [e0, e1] and [e2, e2]: sum_tokens x^2 = [1,1,4,9] and [2,2,2,2];
    # mean over 2 sequences = [1.5, 1.5, 3, 5.5]; score = |W| * sqrt(that).
    # row 0: [1.47, 1.22, 1.56, 1.88] -> zero cols 1, 0 (magnitude would zero 3, 2)
    # row 1: [1.22, 1.22, 1.73, 2.35] -> cols 0, 1
    # row 2: [0.61, 2.45, 1.73, 1.41] -> cols 0, 3
    # row 3: [1.22, 1.22, 1.56, 1.17] -> col 3, then the tie 0/1 goes to 0 (stable sort)
    model = ToyLM()
    wanda_prune(model, torch.tensor([[0, 1], [2, 2]]), 0.5, progress=False)
    zeros = model.blocks[0].proj.weight == 0
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 1], [1, 0, 0, 1]]).bool()
    assert torch.equal(zeros, expected)


def test_magnitude_mask_matches_hand_computation():
    model = ToyLM()
    wanda_prune(model, None, 0.5, method="magnitude", progress=False)
    zeros = model.blocks[0].proj.weight == 0
    expected = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 1, 1]]).bool()
    assert torch.equal(zeros, expected)


def test_unstructured_mask_counts_and_stable_ties():
    scores = torch.tensor([[3.0, 1.0, 2.0, 1.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = unstructured_mask(scores, 0.5)  # int(5 * 0.5) = 2 per row
    assert mask.sum(1).tolist() == [2, 2]
    assert mask[0].tolist() == [False, True, False, True, False]
    assert mask[1].tolist() == [True, True, False, False, False]  # ties: lowest index first
    assert not unstructured_mask(scores, 0.0).any()


def test_nm_mask_exact_pattern():
    scores = torch.tensor([[4.0, 3, 2, 1, 1, 2, 3, 4], [9.0, 1, 8, 2, 5, 5, 5, 5]])
    mask = nm_mask(scores, 2, 4)
    assert mask.int().tolist() == [[0, 0, 1, 1, 1, 1, 0, 0], [0, 1, 0, 1, 1, 1, 0, 0]]
    mask = nm_mask(scores, 1, 4)
    assert mask.int().tolist() == [[0, 0, 0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match="multiple of M"):
        nm_mask(scores[:, :6], 2, 4)


@pytest.mark.parametrize("bad", ["3:2", "2-4", "0:4", "4:4", "2:", "structured", ""])
def test_parse_pattern_rejects(bad):
    with pytest.raises(ValueError):
        parse_pattern(bad)


def test_parse_pattern_accepts():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern("4:8") == (4, 8)


def _stable_sort_mask(scores, k):
    """The definition (the reference's code): the first k of a stable sort of each row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)


def _stable_sort_nm(scores, n, m):
    blocks = scores.reshape(scores.shape[0], -1, m)
    lowest = torch.sort(blocks, dim=2, stable=True).indices[..., :n]
    return torch.zeros_like(blocks, dtype=torch.bool).scatter_(2, lowest, True).reshape(
        scores.shape)


def _tie_heavy_scores(seed):
    """Scores with many exact ties (few distinct levels), +0.0 and -0.0, inf, negatives,
    duplicated columns and whole constant rows: every way a tie at the threshold can occur."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 5, (37, 48), generator=g).float() * 0.25
    s[::5] = 1.0                                      # constant rows
    s[1, ::2] = -0.0                                  # -0.0 ties +0.0
    s[2, :7] = float("inf")
    s[3] = -s[3]                                      # negatives
    s[4, 24:] = s[4, :24]                             # duplicated halves
    s[6] = torch.rand(48, generator=g)                # no ties at all
    return s


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sparsity", [0.0, 0.02, 0.3, 0.5, 0.7, 0.99])
def test_unstructured_mask_is_the_stable_sorts_choice_bit_for_bit(seed, sparsity):
    # issue 18: the selection no longer sorts; ties at the threshold must still fall to the
    # lower column index exactly as torch.sort(stable=True) puts them
    scores = _tie_heavy_scores(seed)
    k = int(scores.shape[1] * sparsity)
    assert torch.equal(unstructured_mask(scores, sparsity), _stable_sort_mask(scores, k))


def test_unstructured_mask_with_nan_sorts_them_last():
    scores = _tie_heavy_scores(0)
    scores[0, :40] = float("nan")   # the threshold itself is NaN in this row
    scores[1, 3] = float("nan")     # a NaN above the threshold
    for sparsity in (0.5, 0.9):
        k = int(48 * sparsity)
        assert torch.equal(unstructured_mask(scores, sparsity), _stable_sort_mask(scores, k))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8), (5, 16), (2, 24)])
def test_nm_mask_is_the_stable_sorts_choice_bit_for_bit(seed, n, m):
    scores = _tie_heavy_scores(seed)
    assert torch.equal(nm_mask(scores, n, m), _stable_sort_nm(scores, n, m))
    scores[0, 5] = float("nan")
    assert torch.equal(nm_mask(scores, n, m), _stable_sort_nm(scores, n, m))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("transposed", [False, True])  # Conv1D's (out, in) view is a transpose
def test_zero_masked_is_masked_fill_bit_for_bit(dtype, transposed):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g).to(dtype)
    w[0, :6] = -0.0
    w[1, :3] = float("inf")
    mask = torch.rand(40, 24, generator=g) < 0.5
    a, b = w.clone(), w.clone()
    view = (lambda t: t.t()) if transposed else (lambda t: t)
    view(a).masked_fill_(view(mask), 0)
    zero_masked_(view(b), view(mask))
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()]
    assert torch.equal(a.view(ints), b.view(ints))  # +0.0 where masked, every other bit kept
