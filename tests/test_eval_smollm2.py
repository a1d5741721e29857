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
