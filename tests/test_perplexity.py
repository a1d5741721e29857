import math

import pytest
import torch
import torch.nn.functional as F
from tiny import make_tiny, random_ids

from shears.evaluation import perplexity


def test_perplexity_matches_a_window_by_window_formula():
    model = make_tiny("llama")
    ids = random_ids(1, 100, seed=5)[0]  # 3 windows of 32, 4 tokens left over
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            window = ids[w * 32 : (w + 1) * 32]
            logits = model(window[None]).logits[0]
            for t in range(31):
                nll -= F.log_softmax(logits[t], -1)[window[t + 1]].item()
                count += 1
    expected = math.exp(nll / count)
    for batch_size in (1, 2, 3):
        got = perplexity(model, ids, 32, batch_size=batch_size, progress=False)
        assert got == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, ids[None], 32, max_windows=1, progress=False) != pytest.approx(
        expected, rel=1e-3)


def test_perplexity_needs_one_window():
    with pytest.raises(ValueError, match="at least 32"):
        perplexity(make_tiny("llama"), torch.arange(10), 32, progress=False)
