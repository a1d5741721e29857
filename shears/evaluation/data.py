"""Instruction-tuning data: tokenised LLM-Adapters records and a padding collator.

Follows LLM-Adapters' finetune.py: prompt and response in one text, truncated to
``cutoff_len`` tokens, EOS appended when there is room, optionally the prompt masked out of
the loss with -100.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # imported where used, so that `import shears` works without `datasets`
    from datasets import Dataset

from shears.evaluation.prompts import format_prompt

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and transformers) skips


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):  # lengths differ: stop at the shorter
        if x != y:
            break
        n += 1
    return n


def tokenize_record(
    record: dict, tokenizer: Any, cutoff_len: int = 256, train_on_inputs: bool = True
) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` (lists of equal length) of a record."""
    prompt = format_prompt(record["instruction"], record.get("input"))
    ids = tokenizer(prompt + record["output"], truncation=True, max_length=cutoff_len)[
        "input_ids"
    ]
    ids = list(ids)
    eos = tokenizer.eos_token_id
    if eos is not None and len(ids) < cutoff_len and (not ids or ids[-1] != eos):
        ids.append(eos)
    labels = list(ids)
    if not train_on_inputs:
        prompt_ids = tokenizer(prompt, truncation=True, max_length=cutoff_len)["input_ids"]
        # Mask the tokens shared with the prompt's own tokenisation. A token that merges
        # the prompt's last characters with the response's first ones stays a label, unlike
        # LLM-Adapters' mask of len(prompt_ids) tokens.
        n = _common_prefix(list(prompt_ids), ids)
        labels[:n] = [IGNORE_INDEX] * n
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def instruction_dataset(
    records: Iterable[dict], tokenizer: Any, cutoff_len: int = 256, train_on_inputs: bool = True
) -> Dataset:
    """A :class:`datasets.Dataset` of tokenised records, ready for a ``Trainer``.

    Columns ``input_ids``, ``attention_mask``, ``labels`` (unpadded lists); batch them with
    :class:`InstructionCollator`. ``train_on_inputs=False`` masks the prompt tokens (-100).
    """
    from datasets import Dataset  # a runtime dependency, but absent from some GPU images

    rows = [tokenize_record(r, tokenizer, cutoff_len, train_on_inputs) for r in records]
    columns = ("input_ids", "attention_mask", "labels")
    return Dataset.from_dict({c: [row[c] for row in rows] for c in columns})


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad token id, else its EOS id (padding is masked out either way);
    0 without a tokenizer."""
    if tokenizer is None:
        return 0
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise ValueError("the tokenizer has neither a pad nor an EOS token")


@dataclass
class InstructionCollator:
    """Pads a list of features into tensors of shape (batch, longest[, rounded up]).

    ``input_ids`` are padded with the pad token (EOS when there is none), ``attention_mask``
    with 0 (and created when absent), ``labels`` (when present) with -100.
    """

    tokenizer: Any = None
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = -(-longest // m) * m
        pad_values = {"input_ids": pad_token_id(self.tokenizer), "attention_mask": 0,
                      "labels": IGNORE_INDEX}
        batch: dict[str, list[list[int]]] = {k: [] for k in pad_values}
        for f in features:
            row = {"input_ids": list(f["input_ids"]),
                   "attention_mask": list(f.get("attention_mask") or [1] * len(f["input_ids"])),
                   "labels": list(f["labels"]) if "labels" in f else None}
            for key, value in row.items():
                if value is not None:
                    batch[key].append(self._pad(value, longest, pad_values[key]))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items() if v}

    def _pad(self, values: list[int], length: int, value: int) -> list[int]:
        fill = [value] * (length - len(values))
        return fill + values if self.padding_side == "left" else values + fill
