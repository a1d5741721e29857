"""The evaluation harness with the real SmolLM2 tokenizer and model (``pytest -m slow``)."""

from pathlib import Path

import pytest

from shears.evaluation import (
    evaluate_generation,
    format_prompt,
    generate_tokens,
    instruction_dataset,
    load_task,
)

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "llm-adapters"


@pytest.fixture(scope="module")
def smollm2():
    from smollm2 import load_smollm2

    return load_smollm2()


def _math_records(n):
    if not (DATA / "math_data.json").exists():
        pytest.skip("shared data absent")
    return load_task("gsm8k", DATA / "math_data.json", limit=n)


def test_training_text_starts_with_the_evaluation_prompt(smollm2):
    _, tok = smollm2
    records = _math_records(32)
    rows = instruction_dataset(records, tok, cutoff_len=256, train_on_inputs=False)
    for rec, row in zip(records, rows, strict=True):
        prompt_ids = tok(format_prompt(rec["instruction"]))["input_ids"]
        # with this tokenizer nothing merges across "### Response:\n": the mask is the prompt
        assert row["input_ids"][: len(prompt_ids)] == prompt_ids
        assert row["labels"][: len(prompt_ids)] == [-100] * len(prompt_ids)
        assert row["labels"][len(prompt_ids)] != -100


def test_batched_generation_matches_single(smollm2):
    model, tok = smollm2
    prompts = [format_prompt(r["instruction"]) for r in _math_records(4)]
    single = generate_tokens(model, tok, prompts, batch_size=1, max_new_tokens=16,
                             progress=False)
    assert generate_tokens(model, tok, prompts, batch_size=4, max_new_tokens=16,
                           progress=False) == single


def test_evaluate_generation_runs(smollm2):
    model, tok = smollm2
    result = evaluate_generation(model, tok, _math_records(2), "gsm8k", batch_size=2,
                                 max_new_tokens=8, progress=False)
    assert len(result.records) == 2 and 0.0 <= result.accuracy <= 1.0


def test_batched_beam_search_matches_model_generate_one_at_a_time(smollm2):
    """The reference's decoding (4 beams), batched and left-padded, against
    ``model.generate`` on each unpadded prompt (prompts of different lengths)."""
    import torch

    model, tok = smollm2
    prompts = [format_prompt(q) for q in (
        "Tom has 3 apples and buys 5 more. How many apples does he have?",
        "A train travels 60 km per hour for 2.5 hours. How far does it go?",
        "What is 12 times 11?",
        "Sara reads 20 pages a day. Her book has 340 pages and she has read 120 of them. "
        "How many more days does she need to finish it?")]
    single = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=4,
                             do_sample=False, length_penalty=1.0, early_stopping=False,
                             max_new_tokens=16, pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        single.append(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new)
    assert generate_tokens(model, tok, prompts, batch_size=4, max_new_tokens=16, num_beams=4,
                           progress=False) == single
