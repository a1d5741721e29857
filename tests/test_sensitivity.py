"""rank_sensitivity against finite differences of a hand-computed loss, and against measured
loss changes of a trained tiny super-adapter; no host sync per batch; the model restored."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from test_nls_sync import count_host_reads_from_shears
from tiny import VOCAB, make_tiny, random_ids, randomize_adapters
from transformers import TrainingArguments

from shears.adapters import add_elastic_lora, get_config, heuristic_config, set_config
from shears.evaluation import InstructionCollator
from shears.search import RankSensitivity, maximal_config, minimal_config, rank_sensitivity
from shears.training import NLSTrainer

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def rows(n: int = 8, seqlen: int = 14, seed: int = 0) -> list[dict]:
    """Records of different lengths whose first tokens (the "prompt") are not scored."""
    ids = random_ids(n, seqlen, seed)
    out = []
    for i in range(n):
        length, prompt = seqlen - i % 4, 3 + i % 3
        x = ids[i, :length].tolist()
        out.append({"input_ids": x, "attention_mask": [1] * length,
                    "labels": [-100] * prompt + x[prompt:]})
    return out


def batches(records: list[dict], size: int = 3) -> list[dict]:
    collate = InstructionCollator(tokenizer=None)
    return [collate(records[i: i + size]) for i in range(0, len(records), size)]


@torch.no_grad()
def hand_loss(model, records: list[dict]) -> float:
    """Token mean of -log p(label) over every scored token, one record at a time, in fp64."""
    nll, count = 0.0, 0
    for r in records:
        logp = torch.log_softmax(model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
                                 .double(), dim=-1)
        for t in range(1, len(r["labels"])):
            if r["labels"][t] != -100:
                nll -= float(logp[t - 1, r["labels"][t]])
                count += 1
    return nll / count


def linear_model(b_scale: float):
    """fp64 tiny Llama with random adapters whose update is ``b_scale`` small. (Llama's
    RMSNorm computes in fp32, so losses carry ~1e-9 of noise: the scale is kept where the
    changes are much larger, and the second-order error much smaller, than that.)"""
    model = add_elastic_lora(make_tiny("llama", seed=1), TARGETS, ranks=(8, 4, 2),
                             groups="qkv")
    randomize_adapters(model, seed=2, a_scale=1.0, b_scale=b_scale)
    return model.double()


def loss_at(model, records, config) -> float:
    previous = get_config(model)
    set_config(model, config)
    try:
        return hand_loss(model, records)
    finally:
        set_config(model, previous)


@pytest.mark.parametrize("anchor", ["maximal", "heuristic"])
def test_tangent_equals_the_finite_difference_in_the_linear_regime(anchor):
    model, records = linear_model(1e-5), rows()
    anchor_config = maximal_config(model) if anchor == "maximal" else heuristic_config(model)
    sens = rank_sensitivity(model, batches(records), anchor_config, method="tangent",
                            progress=False)
    base = loss_at(model, records, anchor_config)
    assert sens.base_loss == pytest.approx(base, rel=1e-12)
    assert sens.anchor == anchor_config
    checked = 0
    for group, deltas in sens.deltas.items():
        for rank, delta in deltas.items():
            measured = loss_at(model, records, {**anchor_config, group: rank}) - base
            if rank == anchor_config[group]:
                assert delta == 0.0
                continue
            # First order in the adapter scale: the error is second order (0.4% at most here,
            # 7% at a scale of 1e-4, the curvature of a random model is large).
            assert abs(measured) > 3e-7
            assert delta == pytest.approx(measured, rel=1e-2), (group, rank)
            checked += 1
    assert checked == len(sens.deltas) * 2
    # Additive across groups in this regime: the smallest sub-adapter, all groups cut.
    low = minimal_config(model)
    assert sens.estimate(low) - base == pytest.approx(loss_at(model, records, low) - base,
                                                      rel=1e-2)


def test_path_equals_the_finite_difference_in_the_linear_regime():
    model, records = linear_model(1e-5), rows()
    sens = rank_sensitivity(model, batches(records), method="path", points=3, progress=False)
    assert sens.anchor == maximal_config(model) and sens.points == 3
    base = loss_at(model, records, sens.anchor)
    assert sens.path_losses[0] == pytest.approx(base, rel=1e-12)
    assert sens.path_losses[-1] == pytest.approx(loss_at(model, records, minimal_config(model)),
                                                 rel=1e-12)
    for group, deltas in sens.deltas.items():
        for rank in (4, 2):
            measured = loss_at(model, records, {**sens.anchor, group: rank}) - base
            # between groups the path also sees the others cut: a second-order difference
            assert deltas[rank] == pytest.approx(measured, rel=3e-2), (group, rank)


def test_path_sums_to_the_loss_change_along_it_as_points_grow():
    """Integrated gradients' completeness: the estimate of the minimal sub-adapter tends to its
    measured loss as the trapezoid rule refines, with the rule's O(h^2) error, far outside the
    linear regime (this scale moves the loss by 0.03, 3 points miss it by 0.05)."""
    model, records = linear_model(1e-2), rows()
    low = minimal_config(model)
    measured = loss_at(model, records, low)
    errors = {n: abs(rank_sensitivity(model, batches(records), method="path", points=n,
                                      progress=False).estimate(low) - measured) for n in (5, 17)}
    assert errors[17] < errors[5] / 8
    assert errors[17] < 0.03 * abs(measured - loss_at(model, records, maximal_config(model)))


def test_second_order_shows_when_the_adapters_are_large():
    """The same check fails when the update is not small: a test that can fail."""
    model, records = linear_model(0.3), rows()
    sens = rank_sensitivity(model, batches(records), method="tangent", progress=False)
    base = loss_at(model, records, sens.anchor)
    errors = [abs(d[2] - (loss_at(model, records, {**sens.anchor, g: 2}) - base)) / abs(d[2])
              for g, d in sens.deltas.items()]
    assert max(errors) > 1e-2


def test_token_mean_does_not_depend_on_batching():
    model, records = linear_model(1e-2), rows()
    one = rank_sensitivity(model, batches(records, 1), progress=False)
    many = rank_sensitivity(model, batches(records, 8), progress=False)
    assert one.tokens == many.tokens == sum(sum(t != -100 for t in r["labels"][1:])
                                            for r in records)
    assert one.base_loss == pytest.approx(many.base_loss, rel=1e-10)
    for g in one.deltas:
        assert one.deltas[g] == pytest.approx(many.deltas[g], rel=1e-8, abs=1e-14)


def copy_task(n: int, seed: int) -> list[dict]:
    """A prompt of 6 tokens, a separator, then the prompt again: the response is learnable."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(1, VOCAB, (6,), generator=g).tolist()
        ids = x + [0] + x
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                    "labels": [-100] * 7 + x})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny super-adapter after 40 NLS steps on the copy task."""
    model = add_elastic_lora(make_tiny("llama", seed=0),
                             ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
                             ranks=(16, 8, 4), alpha=16.0)
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("nls")), max_steps=40,
                             per_device_train_batch_size=8, learning_rate=3e-3, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                             logging_strategy="no")
    torch.set_num_threads(1)
    NLSTrainer(model=model, args=args, train_dataset=copy_task(320, 0), nls_seed=0,
               data_collator=InstructionCollator(tokenizer=None)).train()
    return model.eval()


def test_ranking_correlates_with_measured_single_group_changes(trained):
    held_out = copy_task(32, seed=1)
    sens = rank_sensitivity(trained, batches(held_out, 8), progress=False)
    base = loss_at(trained, held_out, sens.anchor)
    assert sens.base_loss == pytest.approx(base, rel=1e-5)
    estimated, measured = [], []
    for group, deltas in sens.deltas.items():
        for rank in (8, 4):
            estimated.append(deltas[rank])
            measured.append(loss_at(trained, held_out, {**sens.anchor, group: rank}) - base)
    assert len(measured) == 20 and max(measured) > 1e-3  # the cuts do change the loss
    rho = spearmanr(estimated, measured).statistic
    assert rho > 0.7, (rho, estimated, measured)


def test_model_state_is_restored(trained):
    model = trained
    for i, (_, p) in enumerate(model.named_parameters()):
        if i % 3 == 0:
            p.grad = torch.full_like(p, 7.0)  # grads a user had: untouched
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    modules = [m for m in model.modules() if hasattr(m, "rank_mode")]
    modules[0].rank_mode = "mask"
    mask = modules[0].rank_mask
    config = {**heuristic_config(model), next(iter(heuristic_config(model))): 4}
    set_config(model, config)
    model.train()
    rank_sensitivity(model, batches(copy_task(8, 2), 4), progress=False)
    assert model.training and get_config(model) == config
    assert [m.rank_mode for m in modules] == ["mask"] + ["slice"] * (len(modules) - 1)
    assert modules[0].rank_mask is mask and mask.dtype == torch.bool
    r = modules[0].active_rank
    assert mask.tolist() == [True] * r + [False] * (16 - r)
    assert all("rank_mask" not in m._buffers for m in modules[1:])
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n], n
        assert (p.grad is None) == (grads[n] is None) and (
            p.grad is None or torch.equal(p.grad, grads[n])), n
        p.grad = None
    modules[0].rank_mode = "slice"
    model.eval()
    set_config(model, maximal_config(model))


def test_no_host_sync_per_batch(trained, monkeypatch):
    data = copy_task(24, 3)

    def reads(n_batches):
        with monkeypatch.context() as m:
            counts = count_host_reads_from_shears(m)
            rank_sensitivity(trained, batches(data[: 4 * n_batches], 4), progress=False)
        return counts

    few, many = reads(2), reads(6)
    assert few == many, (few, many)
    assert sum(many.values()) <= 2  # the one transfer at the end


def test_save_load_round_trip_and_estimate(tmp_path):
    model, records = linear_model(1e-2), rows()
    sens = rank_sensitivity(model, batches(records), progress=False)
    sens.save(tmp_path / "s.json")
    back = RankSensitivity.load(tmp_path / "s.json")
    assert back == sens
    qkv = "model.layers.0.self_attn.qkv_proj"
    config = {**sens.anchor, qkv: 2}
    assert back.estimate(config) == sens.base_loss + sens.deltas[qkv][2]
    with pytest.raises(ValueError, match="not in"):
        back.estimate({qkv: 3})
    with pytest.raises(KeyError, match="unknown"):
        back.estimate({"nope": 2})


def test_default_is_the_three_point_path():
    """The default a user (and front_search) gets is the estimator that ranked SmolLM2's
    sub-adapters (Spearman 0.95), not the tangent at the maximal one (-0.005)."""
    model, records = linear_model(1e-2), rows()
    default = rank_sensitivity(model, batches(records), progress=False)
    path = rank_sensitivity(model, batches(records), method="path", points=3, progress=False)
    assert (default.method, default.points) == ("path", 3)
    assert default == path
    with pytest.raises(ValueError, match='method="tangent"'):
        rank_sensitivity(model, batches(records), heuristic_config(model), progress=False)


def test_refuses_bad_arguments():
    model, records = linear_model(1e-2), rows()
    with pytest.raises(ValueError, match="method"):
        rank_sensitivity(model, batches(records), method="newton", progress=False)
    with pytest.raises(ValueError, match="anchor"):
        rank_sensitivity(model, batches(records), maximal_config(model), method="path")
    with pytest.raises(ValueError, match="label tokens"):
        rank_sensitivity(model, [dict(b, labels=torch.full_like(b["labels"], -100))
                                 for b in batches(records)], progress=False)
