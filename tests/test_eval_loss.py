"""evaluate_loss against a hand computation of the token-weighted mean loss."""

import math

import pytest
import torch
from tiny import make_tiny, random_ids

from shears.evaluation import evaluate_loss


def _rows():
    """Records of lengths 5, 12, 9 and 20 with 0, 4, all and 2 leading labels masked."""
    ids = random_ids(n=4, seqlen=20, seed=3)
    rows = []
    for r, (n, masked) in enumerate([(5, 0), (12, 4), (9, 9), (20, 2)]):
        x = ids[r, :n].tolist()
        rows.append({"input_ids": x, "attention_mask": [1] * n,
                     "labels": [-100] * masked + x[masked:]})
    return rows


def _by_hand(model, rows):
    """Sum of -log p(label) over every label token of every unpadded record, over the count."""
    nll, count = 0.0, 0
    for row in rows:
        x = torch.tensor([row["input_ids"]])
        logp = torch.log_softmax(model(input_ids=x).logits[0].double(), dim=-1)  # (n, vocab)
        for t in range(1, len(row["labels"])):
            if row["labels"][t] != -100:
                nll -= logp[t - 1, row["labels"][t]].item()
                count += 1
    return nll / count, count


@torch.no_grad()
def test_token_weighted_mean_matches_hand_computation():
    model, rows = make_tiny("llama", seed=0), _rows()
    expected, count = _by_hand(model, rows)
    assert count == 4 + 8 + 0 + 18  # the 9-token record has no label left
    for batch_size in (1, 3, 8):
        assert evaluate_loss(model, rows, batch_size=batch_size) == pytest.approx(expected,
                                                                                   rel=1e-5)


@torch.no_grad()
def test_is_not_a_mean_of_per_record_means():
    model, rows = make_tiny("llama", seed=0), _rows()
    means = [_by_hand(model, [r])[0] for r in rows if any(t != -100 for t in r["labels"][1:])]
    assert not math.isclose(sum(means) / len(means), evaluate_loss(model, rows), rel_tol=1e-4)


def test_accepts_a_datasets_dataset_and_keeps_training_mode():
    from datasets import Dataset

    model, rows = make_tiny("llama", seed=1), _rows()
    ds = Dataset.from_list(rows)
    model.train()
    assert evaluate_loss(model, ds, batch_size=2) == pytest.approx(evaluate_loss(model, rows))
    assert model.training


def test_no_labels_is_an_error():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="no label tokens"):
        evaluate_loss(model, [{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}])
