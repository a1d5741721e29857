"""Batched generation on tiny models: greedy against a plain argmax loop, 4-beam search
(the LLM-Adapters protocol) against `model.generate` called one prompt at a time."""

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


# ---- beam search (num_beams=4, the reference's decoding) -------------------------------------
REFERENCE_BEAMS = dict(num_beams=4, do_sample=False, length_penalty=1.0, early_stopping=False,
                       repetition_penalty=1.0, no_repeat_ngram_size=0)


def _beams_one_at_a_time(model, tok, prompts, new: int, eos: list[int], top: int = 1):
    """``model.generate`` on each prompt alone (no padding), with the settings of LLM-Adapters'
    GenerationConfig(num_beams=4) spelled out: the new tokens up to EOS, and the score gap
    between the best two finished hypotheses."""
    tokens, gaps = [], []
    for prompt in prompts:
        ids = torch.tensor([tok(prompt).input_ids])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=new, eos_token_id=eos, pad_token_id=0,
                             num_return_sequences=2, output_scores=True,
                             return_dict_in_generate=True, **REFERENCE_BEAMS)
        new_ids = out.sequences[0, ids.shape[1]:].tolist()
        tokens.append(new_ids[: next((j for j, t in enumerate(new_ids) if t in eos), new)])
        gaps.append(float(out.sequences_scores[0] - out.sequences_scores[1]))
    return tokens, gaps


def _beam_model(family: str, seed: int, new: int):
    """A lively fp64 tiny model (no near-ties for padding's rounding to flip) whose rows end
    at different steps: a token its greedy answers emit is declared a second EOS."""
    tok = char_tokenizer(bos=family == "llama")
    model = _lively(make_tiny(family, seed=seed, dtype=torch.float64))
    greedy = generate_tokens(model, tok, PROMPTS, batch_size=1, max_new_tokens=new,
                             progress=False)
    stop = next(t[2] for t in greedy if len(t) > 2)
    model.generation_config.eos_token_id = stop
    return model, tok, [stop, tok.eos_token_id]


# gpt2 and opt: learned absolute positions; llama: rotary positions from the attention mask
@pytest.mark.parametrize("family, seed", [("llama", 1), ("gpt2", 0), ("opt", 1)])
def test_batched_beam_search_equals_one_prompt_at_a_time(family, seed):
    new = 12
    model, tok, eos = _beam_model(family, seed, new)
    expected, gaps = _beams_one_at_a_time(model, tok, PROMPTS, new, eos)
    for batch_size in (5, 3):  # every prompt in one batch; and batches of mixed lengths
        got = generate_tokens(model, tok, PROMPTS, batch_size=batch_size, max_new_tokens=new,
                              num_beams=4, progress=False)
        assert got == expected, batch_size
    # The comparison means something: beams finish at different steps (so the length
    # penalty and the stopping rule act), beam search answers otherwise than greedy
    # decoding, and the winning hypotheses are not near-ties.
    assert len({len(t) for t in expected}) > 1
    greedy = generate_tokens(model, tok, PROMPTS, batch_size=1, max_new_tokens=new,
                             progress=False)
    assert sum(g != b for g, b in zip(greedy, expected, strict=True)) >= 2
    assert min(gaps) > 1e-4


def test_beam_settings_are_the_references_whatever_the_checkpoint_says():
    """LLM-Adapters builds a fresh GenerationConfig(num_beams=4): length penalty 1, no early
    stopping, no repetition penalty. A checkpoint's own generation settings do not apply."""
    new = 12
    model, tok, eos = _beam_model("llama", 1, new)
    expected, _ = _beams_one_at_a_time(model, tok, PROMPTS, new, eos)
    model.generation_config.update(length_penalty=-2.0, early_stopping=True,
                                   repetition_penalty=1.5, no_repeat_ngram_size=2)
    own = []  # what the checkpoint's settings would give: not the reference's answers
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        out = model.generate(input_ids=torch.tensor([ids]), num_beams=4, max_new_tokens=new,
                             pad_token_id=0)[0, len(ids):].tolist()
        own.append(out[: next((j for j, t in enumerate(out) if t in eos), new)])
    assert own != expected
    got = generate_tokens(model, tok, PROMPTS, batch_size=5, max_new_tokens=new, num_beams=4,
                          progress=False)
    assert got == expected


def test_evaluate_generation_passes_num_beams_and_rule(monkeypatch):
    records = [{"instruction": "Pick.", "input": "", "output": "", "answer": "A"},
               {"instruction": "Pick.", "input": "", "output": "", "answer": "B"}]
    seen = {}

    def fake(model, tokenizer, prompts, batch_size, max_new_tokens, num_beams, progress):
        seen["num_beams"] = num_beams
        return ["Answer: (B)", "Answer: (B)"]

    monkeypatch.setattr(gen, "generate_responses", fake)
    ref = evaluate_generation(None, None, records, "AQuA", num_beams=4, progress=False,
                              rule="llm-adapters")
    assert seen["num_beams"] == 4
    assert [r["prediction"] for r in ref.records] == ["A", "A"] and ref.accuracy == 0.5
    own = evaluate_generation(None, None, records, "AQuA", progress=False)
    assert seen["num_beams"] == 1
    assert [r["prediction"] for r in own.records] == ["B", "B"] and own.accuracy == 0.5
    with pytest.raises(ValueError, match="answer rule"):
        evaluate_generation(None, None, records, "AQuA", progress=False, rule="paper")


@pytest.mark.parametrize("beams", [0, -1, 2.0])
def test_num_beams_must_be_a_positive_integer(beams):
    model, tok = make_tiny("llama", seed=0), char_tokenizer()
    with pytest.raises(ValueError, match="num_beams must be a positive integer"):
        generate_tokens(model, tok, PROMPTS[:1], num_beams=beams, progress=False)
