"""The stand-ins examples/tour.ipynb uses under ``SHEARS_TOUR_TINY=1`` (tests/test_tour.py).

A tiny random Llama and a character-level tokenizer, built without any download, so that
the notebook runs top to bottom in seconds; the data folder comes from the test.
"""

from __future__ import annotations

import torch
from test_eval_tokenizer import char_tokenizer
from tiny import make_tiny


def tiny_model_and_tokenizer():
    """``(model, tokenizer)``: tests/tiny.py's Llama (hidden 64, 2 blocks), one char a token."""
    torch.set_num_threads(1)  # a tiny model runs faster on one thread (see conftest.py)
    return make_tiny("llama"), char_tokenizer()
