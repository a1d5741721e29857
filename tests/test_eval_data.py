"""instruction_dataset and InstructionCollator on a character-level tokenizer.

With one token per character, token counts are character counts, so the expected masks
and lengths are computed here from the strings alone.
"""

import torch
from test_eval_tokenizer import char_tokenizer

from shears.evaluation import InstructionCollator, format_prompt, instruction_dataset

REC = {"instruction": "Add 2 and 3.", "input": "", "output": "2+3=5. The answer is 5.",
       "answer": "5"}
PROMPT = format_prompt(REC["instruction"])
FULL = PROMPT + REC["output"]


def test_full_text_with_eos_and_labels_equal_ids():
    tok = char_tokenizer()
    ds = instruction_dataset([REC], tok, cutoff_len=1000)
    row = ds[0]
    assert row["input_ids"] == tok(FULL).input_ids + [tok.eos_token_id]
    assert row["labels"] == row["input_ids"]
    assert row["attention_mask"] == [1] * (len(FULL) + 1)


def test_prompt_masked_when_not_training_on_inputs():
    tok = char_tokenizer()
    row = instruction_dataset([REC], tok, cutoff_len=1000, train_on_inputs=False)[0]
    n = len(PROMPT)
    assert row["labels"][:n] == [-100] * n
    assert row["labels"][n:] == row["input_ids"][n:]
    assert tok.decode(row["labels"][n:-1]) == REC["output"]


def test_bos_is_part_of_the_masked_prompt():
    tok = char_tokenizer(bos=True)
    row = instruction_dataset([REC], tok, cutoff_len=1000, train_on_inputs=False)[0]
    assert row["input_ids"][0] == tok.bos_token_id
    n = len(PROMPT) + 1
    assert row["labels"][:n] == [-100] * n and row["labels"][n] != -100


def test_token_spanning_prompt_and_response_is_learned():
    # "### Response:\n" + "\nA: 5" tokenises the two newlines as one token: it carries
    # response text, so it must stay a label (LLM-Adapters masked it by prompt length)
    tok = char_tokenizer(merge_newlines=True)
    rec = dict(REC, output="\nA: 5")
    row = instruction_dataset([rec], tok, cutoff_len=1000, train_on_inputs=False)[0]
    prompt_ids = tok(PROMPT).input_ids
    at = len(prompt_ids) - 1  # where the prompt's last "\n" became "\n\n"
    assert row["input_ids"][:at] == prompt_ids[:at]
    assert row["input_ids"][at] == tok.convert_tokens_to_ids("\n\n")
    assert row["labels"][:at] == [-100] * at
    assert row["labels"][at:] == row["input_ids"][at:]


def test_cutoff_truncates_and_eos_only_when_it_fits():
    tok = char_tokenizer()
    n = len(FULL)
    exact = instruction_dataset([REC], tok, cutoff_len=n)[0]["input_ids"]
    assert len(exact) == n and exact[-1] != tok.eos_token_id  # no room for EOS
    room = instruction_dataset([REC], tok, cutoff_len=n + 1)[0]["input_ids"]
    assert len(room) == n + 1 and room[-1] == tok.eos_token_id
    short = instruction_dataset([REC], tok, cutoff_len=50, train_on_inputs=False)[0]
    assert len(short["input_ids"]) == 50 and short["labels"] == [-100] * 50


def test_input_field_goes_into_the_prompt():
    tok = char_tokenizer()
    rec = dict(REC, input="2 and 3")
    row = instruction_dataset([rec], tok, cutoff_len=1000)[0]
    assert tok.decode(row["input_ids"][:-1]) == format_prompt(rec["instruction"], "2 and 3",
                                                             rec["output"])


def test_collator_pads_right_with_ignored_labels():
    tok = char_tokenizer()
    feats = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
             {"input_ids": [8], "attention_mask": [1], "labels": [8]}]
    batch = InstructionCollator(tok)(feats)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["input_ids"].dtype == torch.long


def test_collator_multiple_of_left_side_and_eos_fallback():
    tok = char_tokenizer(pad=False)
    feats = [{"input_ids": [5, 6, 7]}, {"input_ids": [8]}]  # no mask, no labels
    batch = InstructionCollator(tok, pad_to_multiple_of=4, padding_side="left")(feats)
    eos = tok.eos_token_id
    assert batch["input_ids"].tolist() == [[eos, 5, 6, 7], [eos, eos, eos, 8]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert "labels" not in batch


def test_dataset_feeds_collator():
    tok = char_tokenizer()
    recs = [REC, dict(REC, output="5")]
    ds = instruction_dataset(recs, tok, cutoff_len=1000)
    batch = InstructionCollator(tok)([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, len(FULL) + 1)
    assert (batch["labels"][1] == -100).sum() == len(REC["output"]) - 1
