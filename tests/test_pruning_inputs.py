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
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("inf"))
    with pytest.raises(RuntimeError, match=r"model\.layers\.0"):
        wanda_prune(model, random_ids(2, 8), progress=False)


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
