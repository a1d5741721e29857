"""stratified_batches: a judge and a sensitivity that weigh strata as a mean over test sets
does, checked against per-stratum judges and a hand-computed weighted mean."""

from __future__ import annotations

import pytest
import torch
from test_sensitivity import batches, hand_loss, linear_model, rows

from shears.search import (
    heuristic_config,
    make_chunked_evaluator,
    minimal_config,
    rank_sensitivity,
    set_config,
    stratified_batches,
)
from shears.search.chunked import token_loss

STRATA = {"long": rows(7, seqlen=16, seed=3), "short": rows(3, seqlen=9, seed=4)}


@pytest.fixture(scope="module")
def model():
    return linear_model(b_scale=0.3)


def test_token_loss_weighs_each_record_by_its_weight(model):
    records = rows(4, seed=5)
    batch = batches(records, size=4)[0]
    w = torch.tensor([0.5, 2.0, 1.0, 0.0], dtype=torch.float64)
    with torch.no_grad():
        total, count = token_loss(model, {**batch, "weights": w})
    n = [sum(t != -100 for t in r["labels"][1:]) for r in records]
    per = [hand_loss(model, [r]) for r in records]  # each record's own token mean
    weighted = [(wi * ni, wi * ni * li) for wi, ni, li in zip(w.tolist(), n, per, strict=True)]
    expected = sum(s for _, s in weighted) / sum(c for c, _ in weighted)
    assert float(count) == pytest.approx(sum(c for c, _ in weighted))
    assert float(total) / float(count) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("weights", [None, {"long": 1.0, "short": 3.0}])
def test_judge_is_the_weighted_mean_of_the_strata(model, weights):
    mixed = stratified_batches({n: batches(r) for n, r in STRATA.items()}, weights)
    w = weights or {n: 1.0 for n in STRATA}
    config = heuristic_config(model)
    set_config(model, config)
    expected = sum(w[n] * hand_loss(model, r) for n, r in STRATA.items()) / sum(w.values())
    assert make_chunked_evaluator(model, mixed)(config) == pytest.approx(expected, rel=1e-9)
    # a plain token mean over the same records weighs the long stratum more: not the same
    plain = make_chunked_evaluator(model, [b for r in STRATA.values() for b in batches(r)])
    assert abs(plain(config) - expected) > 1e-4


def test_batches_interleave_the_strata():
    mixed = stratified_batches({n: batches(r) for n, r in STRATA.items()})
    # long: 3 batches of 7 records, short: 1 batch; round-robin puts short second
    assert [b["input_ids"].shape[0] for b in mixed] == [3, 3, 3, 1]
    assert mixed[1]["weights"][0] != mixed[0]["weights"][0]


def test_sensitivity_is_the_weighted_mean_of_the_strata_sensitivities(model):
    w = {"long": 1.0, "short": 3.0}
    mixed = stratified_batches({n: batches(r) for n, r in STRATA.items()}, w)
    joint = rank_sensitivity(model, mixed, method="path", points=2, progress=False)
    parts = {n: rank_sensitivity(model, batches(r), method="path", points=2, progress=False)
             for n, r in STRATA.items()}
    assert joint.tokens == pytest.approx(1.0)
    mean = sum(w.values())
    assert joint.base_loss == pytest.approx(
        sum(w[n] * p.base_loss for n, p in parts.items()) / mean, rel=1e-9)
    config = minimal_config(model)
    assert joint.estimate(config) == pytest.approx(
        sum(w[n] * p.estimate(config) for n, p in parts.items()) / mean, rel=1e-7)


def test_rejects_empty_or_negative_strata():
    with pytest.raises(ValueError):
        stratified_batches({})
    with pytest.raises(ValueError):
        stratified_batches({n: batches(r) for n, r in STRATA.items()}, {"long": -1, "short": 1})
