"""Masks and scores against hand-computed answers."""

import pytest
import torch
from torch import nn

from shears import wanda_prune
from shears.pruning.masks import nm_mask, parse_pattern, unstructured_mask


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
