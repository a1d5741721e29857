"""Batched greedy generation on tiny fp32 models, checked against a plain argmax loop."""

import pytest
import torch
from test_eval_tokenizer import char_tokenizer
from tiny import make_tiny

import shears.evaluation.generation as gen
from shears.evaluation import (
    EvalResult,
    evaluate_generation,
    format_prompt,
    generate_responses,
    generate_tokens,
)

RECORDS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "", "answer": "5"},
    {"instruction": "What is 12 times 11, in dollars?", "input": "", "output": "", "answer": "132"},
    {"instruction": "Sum.", "input": "1, 2", "output": "", "answer": "3"},
    {"instruction": "Tom had 7 apples and ate 2. How many are left?", "input": "", "output": "",
     "answer": "5"},
    {"instruction": "Half of 9?", "input": "", "output": "", "answer": "4.5"},
]
PROMPTS = [format_prompt(r["instruction"], r["input"]) for r in RECORDS]


def _greedy_by_hand(model, tokenizer, prompt: str, new: int) -> str:
    """Argmax of full (uncached, unpadded) forward passes, one token at a time."""
    ids = torch.tensor([tokenizer(prompt).input_ids])
    out = []
    for _ in range(new):
        nxt = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(out, skip_special_tokens=True).split("### Response:")[0].strip()


def _lively(model):
    """Re-draw the matrices with a larger spread: the default init (std 0.02) makes a tiny
    model repeat one token whatever the prompt, which would make the comparisons vacuous."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


# gpt2 and opt: learned absolute positions, which left padding must not shift
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_batched_equals_one_at_a_time(family):
    model, tok = _lively(make_tiny(family, seed=0)), char_tokenizer()
    kw = dict(max_new_tokens=8, progress=False)
    single = generate_tokens(model, tok, PROMPTS, batch_size=1, **kw)
    assert generate_tokens(model, tok, PROMPTS, batch_size=4, **kw) == single
    assert all(len(t) == 8 for t in single)  # no EOS from these random models: full length
    assert len({tuple(t) for t in single}) == len(PROMPTS)  # and the prompts matter


def test_rows_stopping_early_are_cut_at_eos():
    model, tok = _lively(make_tiny("llama", seed=0)), char_tokenizer()
    full = generate_tokens(model, tok, PROMPTS, batch_size=1, max_new_tokens=8, progress=False)
    # declare a token the model emits as a (second) EOS: rows now stop at different steps
    stop = full[0][3]
    model.generation_config.eos_token_id = stop
    expected = [t[: t.index(stop)] if stop in t else t for t in full]
    assert len({len(t) for t in expected}) > 1
    for bs in (1, 5):
        got = generate_tokens(model, tok, PROMPTS, batch_size=bs, max_new_tokens=8,
                              progress=False)
        assert got == expected


def test_matches_a_plain_argmax_loop():
    model, tok = _lively(make_tiny("llama", seed=2)), char_tokenizer(bos=True)
    got = generate_responses(model, tok, PROMPTS[:3], batch_size=3, max_new_tokens=10,
                             progress=False)
    assert got == [_greedy_by_hand(model, tok, p, 10) for p in PROMPTS[:3]]


def test_tokenizer_and_model_state_are_left_alone():
    model, tok = make_tiny("llama", seed=0), char_tokenizer(pad=False)
    tok.padding_side = "right"
    model.train()
    generate_responses(model, tok, PROMPTS[:2], batch_size=2, max_new_tokens=3, progress=False)
    assert tok.pad_token is None and tok.padding_side == "right"
    assert model.training


def test_evaluate_generation_scores_outputs(monkeypatch):
    canned = ["2 + 3 = 5. The answer is 5.", "The answer is 1,32.", "3", "I don't know",
              "9 / 2 = 4.5"]
    seen = {}

    def fake(model, tokenizer, prompts, *args):
        seen["prompts"] = prompts
        return canned

    monkeypatch.setattr(gen, "generate_responses", fake)
    result = evaluate_generation(None, None, RECORDS, "MultiArith", progress=False)
    assert isinstance(result, EvalResult) and result.task == "MultiArith"
    assert seen["prompts"] == PROMPTS
    assert [r["correct"] for r in result.records] == [True, True, True, False, True]
    assert result.records[3]["prediction"] is None
    assert result.n_correct == 4 and result.accuracy == pytest.approx(0.8)
    assert result.records[1] == {"prompt": PROMPTS[1], "output": canned[1],
                                 "prediction": 132.0, "label": "132", "correct": True}


def test_result_saves_as_json(tmp_path):
    import json

    res = EvalResult("boolq", 0.5, [{"prompt": "p", "output": "true", "prediction": "true",
                                     "label": "true", "correct": True}])
    res.save(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["accuracy"] == 0.5


def test_end_to_end_on_tiny_model():
    model, tok = make_tiny("llama", seed=0), char_tokenizer()
    result = evaluate_generation(model, tok, RECORDS, "gsm8k", batch_size=2, max_new_tokens=4,
                                 progress=False)
    assert len(result.records) == len(RECORDS)
    assert result.accuracy == sum(r["correct"] for r in result.records) / len(RECORDS)
