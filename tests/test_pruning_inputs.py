"""Bad input fails loudly and before any weight changes; calibration_data windows."""

import pytest
import torch
from tiny import make_tiny, random_ids

from shears import calibration_data, wanda_prune


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def unchanged(model, before):
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


BAD_CALLS = [
    (dict(sparsity=1.0), ValueError, "sparsity"),
    (dict(sparsity=-0.1), ValueError, "sparsity"),
    (dict(pattern="3:2"), ValueError, "0 < N < M"),
    (dict(pattern="2-4"), ValueError, "N:M"),
    (dict(pattern="0:4"), ValueError, "0 < N < M"),
    (dict(pattern="2:4", sparsity=0.6), ValueError, "contradicts"),
    (dict(calibration=torch.empty(0, 16, dtype=torch.long)), ValueError, "shape"),
    (dict(calibration=[]), ValueError, "empty"),
    (dict(calibration=torch.rand(4, 16)), TypeError, "integer"),
    (dict(calibration=torch.zeros(4, 16, 2, dtype=torch.long)), ValueError, "shape"),
    (dict(calibration=torch.zeros(16, dtype=torch.long)), ValueError, "shape"),
    (dict(calibration=None), ValueError, "calibration"),
    (dict(calibration=[torch.zeros(4)]), TypeError, "input_ids"),
    (dict(targets="no_such_module"), ValueError, "candidates: model.layers.0.self_attn.q_proj"),
    (dict(method="sparsegpt"), ValueError, "method"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(sparsity="0.5"), TypeError, r"sparsity must be a number .* got str '0\.5'"),
    (dict(sparsity=True), TypeError, "sparsity must be a number"),
    (dict(sparsity=float("nan")), ValueError, "sparsity"),
    (dict(calibration=torch.tensor([[3, 128, 5]])), ValueError,
     r"vocabulary size 128 .* ids from 3 to 128"),
    (dict(calibration=torch.tensor([[3, -1, 5]])), ValueError,
     r"vocabulary size 128 .* ids from -1 to 5"),
    (dict(calibration=[{"input_ids": [1, 2]}, {"input_ids": [9000]}]), ValueError,
     r"token ids must be in \[0, 128\)"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_CALLS)
def test_bad_input_raises_before_touching_weights(kwargs, error, message):
    model = make_tiny("llama")
    before = snapshot(model)
    kwargs = {"calibration": random_ids(2, 8), **kwargs}
    with pytest.raises(error, match=message):
        wanda_prune(model, progress=False, **kwargs)
    assert unchanged(model, before)


def test_meta_device_model():
    with torch.device("meta"):
        model = make_tiny("llama")
    with pytest.raises(ValueError, match="meta"):
        wanda_prune(model, random_ids(2, 8), progress=False)


def test_non_finite_activations_name_the_block():
    model = make_tiny("llama")
    with torch.no_grad():  # a norm is never pruned, so its weights are not checked up front
        model.model.layers[0].post_attention_layernorm.weight.fill_(float("inf"))
    with pytest.raises(RuntimeError, match=r"model\.layers\.0"):
        wanda_prune(model, random_ids(2, 8), progress=False)


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_in_the_last_block_is_refused_before_any_change(method, value):
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight[3, 5] = value
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        wanda_prune(model, random_ids(2, 8), method=method, progress=False)
    assert all(torch.equal(p, before[n]) or n.endswith("down_proj.weight")
               for n, p in model.named_parameters())
    w = model.model.layers[-1].mlp.down_proj.weight  # NaN != NaN: compare it apart
    assert torch.equal(w.isnan(), before["model.layers.1.mlp.down_proj.weight"].isnan())
    assert (model.model.layers[0].self_attn.q_proj.weight != 0).all()  # block 0 untouched


def test_non_finite_weight_outside_the_targets_is_not_ours_to_refuse():
    # only the maps to be pruned are checked: excluded ones are the user's business
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight[0, 0] = float("nan")
    report = wanda_prune(model, random_ids(2, 8), method="magnitude", exclude="down_proj",
                         progress=False)
    assert "model.layers.1.mlp.down_proj" not in {m.name for m in report.modules}


def test_a_real_vocabulary_id_range_is_accepted():
    ids = torch.tensor([[0, 127, 64, 1]])  # the edges of the tiny vocabulary
    wanda_prune(make_tiny("llama"), ids, progress=False)


class CharTokenizer:
    """One token per character: enough to check the windowing."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        class Out:
            input_ids = torch.tensor([[ord(c) for c in text]])
        return Out()


def test_calibration_windows_are_seeded_slices_of_the_text():
    text = "".join(chr(97 + i % 26) for i in range(500))
    ids = calibration_data(CharTokenizer(), [text], nsamples=5, seqlen=20, seed=3)
    assert ids.shape == (5, 20) and ids.dtype == torch.long
    full = torch.tensor([ord(c) for c in text])
    for row in ids:  # each row is a contiguous window of the text
        start = int(torch.nonzero(full == row[0])[0])
        starts = [s for s in range(start, 480, 26) if torch.equal(full[s : s + 20], row)]
        assert starts
    assert torch.equal(ids, calibration_data(CharTokenizer(), [text], 5, 20, seed=3))
    assert not torch.equal(ids, calibration_data(CharTokenizer(), [text], 5, 20, seed=4))


def test_calibration_accepts_a_dataset_and_rejects_short_text():
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["x" * 30, "", "y" * 30]})
    ids = calibration_data(CharTokenizer(), ds, nsamples=2, seqlen=10)
    assert ids.shape == (2, 10)
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_data(CharTokenizer(), ["short"], nsamples=1, seqlen=10)
    with pytest.raises(ValueError, match="'text' column"):
        calibration_data(CharTokenizer(), datasets.Dataset.from_dict({"t": ["a"]}))
