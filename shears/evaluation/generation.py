"""Accuracy by generation, the LLM-Adapters protocol: prompt, generate, extract, compare.

The reference (LLM-Adapters evaluate.py:37-66 and commonsense_evaluate.py:37-64; the
authors' Shears/run_math.py:444-476 and run_commonsense.py:451-483) decodes with
``GenerationConfig(temperature=0.1, top_p=0.75, top_k=40, num_beams=4)`` and no
``do_sample``: 4-beam search (the sampling settings are inert), 256 new tokens for math and
32 for commonsense. ``num_beams=4`` here is that decoding; the default ``num_beams=1`` is
greedy, cheaper and not the reference's.

Prompts are batched with left padding (so every row's new tokens start at the same column)
and generated with the KV cache. Batches are formed from prompts of similar length, which
keeps padding, and so wasted compute, small; results come back in the records' order.
Batched beam search gives the answers of one prompt at a time (tests/test_generation.py).
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from shears.atomic import write_json
from shears.evaluation.answers import extract_answer, is_correct
from shears.evaluation.data import InstructionCollator, pad_token_id
from shears.evaluation.prompts import format_prompt
from shears.evaluation.tasks import task_name

STOP_MARKER = "### Response:"  # LLM-Adapters keeps the text before a second response


@dataclass
class EvalResult:
    """Accuracy on a task, with per-record ``prompt``, ``output``, ``prediction``, ``label``
    and ``correct`` in ``records``."""

    task: str
    accuracy: float
    records: list[dict] = field(default_factory=list)

    @property
    def n_correct(self) -> int:
        return sum(r["correct"] for r in self.records)

    def save(self, path: str | os.PathLike) -> None:
        """Write the result as JSON (predictions of math tasks are floats or null), atomically:
        after a crash ``path`` holds the previous file or the new one, whole."""
        write_json(path, asdict(self), indent=1)


# The reference's GenerationConfig(num_beams=4) leaves these at their defaults; a checkpoint's
# generation config (which transformers merges into ours where we leave a field unset) must
# not change the decoding, so they are spelled out.
_REFERENCE_DECODING = dict(do_sample=False, temperature=None, top_p=None, top_k=None,
                           length_penalty=1.0, early_stopping=False, num_return_sequences=1,
                           repetition_penalty=1.0, no_repeat_ngram_size=0)


def _generation_config(model: Any, tokenizer: Any, max_new_tokens: int, num_beams: int):
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
    config = copy.deepcopy(model.generation_config)
    # Stop at the tokenizer's EOS (what instruction_dataset appends) and the model's own.
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    # Greedy or beam search: sampling and beam settings a checkpoint may carry are cleared.
    config.update(**_REFERENCE_DECODING, num_beams=num_beams, max_new_tokens=max_new_tokens,
                  use_cache=True, pad_token_id=pad_token_id(tokenizer), eos_token_id=eos or None)
    return config


@torch.no_grad()
def generate_tokens(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    batch_size: int = 16,
    max_new_tokens: int = 256,
    num_beams: int = 1,
    progress: bool = True,
) -> list[list[int]]:
    """The ids of the tokens generated after each prompt, up to (not including) EOS.

    ``num_beams=1`` decodes greedily, ``num_beams=4`` is the reference's beam search. The
    tokenizer is not modified: padding (left, with the pad token or else EOS) is done
    here rather than through its ``padding_side``/``pad_token`` settings.
    """
    config = _generation_config(model, tokenizer, max_new_tokens, num_beams)
    stop = set(config.eos_token_id or [])
    collate = InstructionCollator(tokenizer, padding_side="left")
    device = next(model.parameters()).device
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))  # longest first
    generated: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generate",
                          disable=not progress, leave=False):
            rows = order[start : start + batch_size]
            batch = collate([{"input_ids": ids[i]} for i in rows])  # (b, longest), left-padded
            batch = {k: v.to(device) for k, v in batch.items()}
            seqs = model.generate(**batch, generation_config=config)  # (b, longest + new)
            for i, new in zip(rows, seqs[:, batch["input_ids"].shape[1]:].tolist(), strict=True):
                # a row that finished early is filled with padding up to the batch's longest
                end = next((j for j, t in enumerate(new) if t in stop), len(new))
                generated[i] = new[:end]
    finally:
        model.train(was_training)
    return generated


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    batch_size: int = 16,
    max_new_tokens: int = 256,
    num_beams: int = 1,
    progress: bool = True,
) -> list[str]:
    """The model's response to each prompt: :func:`generate_tokens` decoded (special tokens
    skipped), cut before a generated ``"### Response:"`` as LLM-Adapters does, stripped."""
    tokens = generate_tokens(model, tokenizer, prompts, batch_size, max_new_tokens, num_beams,
                             progress)
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return [t.split(STOP_MARKER)[0].strip() for t in texts]


def evaluate_generation(
    model: Any,
    tokenizer: Any,
    records: list[dict],
    task: str,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    num_beams: int = 1,
    progress: bool = True,
    rule: str = "shears",
) -> EvalResult:
    """Accuracy of ``model`` on ``records`` of ``task`` (see :mod:`shears.evaluation.tasks`).

    Greedy decoding by default (``num_beams=1``); the reference decodes with ``num_beams=4``
    and 256 new tokens (math) or 32 (commonsense). ``rule`` is the answer extraction,
    ``"shears"`` or ``"llm-adapters"`` (see :func:`~shears.evaluation.extract_answer`).
    """
    task = task_name(task)
    extract_answer("", task, rule)  # an unknown task or rule fails before any generation
    prompts = [format_prompt(r["instruction"], r.get("input")) for r in records]
    outputs = generate_responses(model, tokenizer, prompts, batch_size, max_new_tokens,
                                 num_beams, progress)
    rows = []
    for record, prompt, output in zip(records, prompts, outputs, strict=True):
        prediction = extract_answer(output, task, rule)
        rows.append({"prompt": prompt, "output": output, "prediction": prediction,
                     "label": record["answer"],
                     "correct": is_correct(prediction, record["answer"], task)})
    accuracy = sum(r["correct"] for r in rows) / len(rows) if rows else 0.0
    return EvalResult(task=task, accuracy=accuracy, records=rows)
