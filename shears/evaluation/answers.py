"""Answer extraction and scoring, following the LLM-Adapters evaluation scripts.

* math tasks: the last number of the response, commas removed; correct when within 1e-3
  of the label. No number means no answer (the original scored ``inf``: the same outcome).
* AQuA: a letter A-E. The original took the first capital A-E anywhere, so "Answer: C"
  gave A; here an explicit answer statement wins, then a parenthesised letter, then a
  response that is only a letter; otherwise no answer.
* commonsense tasks: the first word of the task's vocabulary (``true``/``false``,
  ``solution1``...), as a whole word and in lower case as the labels are written. The
  prompts list the choices capitalised ("Answer1: ..."), so a response that echoes them
  is not taken for an answer.
"""

from __future__ import annotations

import re

from shears.evaluation.tasks import task_kind

# An optional minus, then digits with an optional fraction, or a bare fraction (".5").
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")
# "answer is (C)", "Answer: C", "answer is option E", "answer: (B)"
_LETTER_STATED = re.compile(r"(?i:answer)\s*(?:(?i:is)|:)?\s*(?i:option)?\s*\(?([A-E])\b")
_LETTER_PAREN = re.compile(r"\(([A-E])\)")
_LETTER_ALONE = re.compile(r"\(?([A-E])\)?[.:]?")

Answer = float | str | None


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def _letter(text: str) -> str | None:
    for pattern in (_LETTER_STATED, _LETTER_PAREN):
        found = pattern.findall(text)
        if found:
            return found[-1]  # the last statement, like the last number of a math answer
    alone = _LETTER_ALONE.fullmatch(text.strip())
    return alone.group(1) if alone else None


def _first_word(text: str, vocabulary: tuple[str, ...]) -> str | None:
    found = re.search(r"\b(" + "|".join(vocabulary) + r")\b", text)
    return found.group(1) if found else None


def extract_answer(text: str, task: str) -> Answer:
    """The answer in a model's response ``text`` for ``task``, or None when there is none.

    Returns a float for math tasks, a letter for AQuA, a vocabulary word for commonsense
    tasks. Raises KeyError for an unknown task.
    """
    kind = task_kind(task)
    if kind == "math":
        return _last_number(text)
    if kind == "letter":
        return _letter(text)
    return _first_word(text, kind)


def is_correct(prediction: Answer, label: str | float, task: str) -> bool:
    """Whether ``prediction`` (from :func:`extract_answer`) matches the record's ``label``."""
    if prediction is None:
        return False
    if task_kind(task) == "math":
        return abs(float(prediction) - float(label)) <= 1e-3
    return prediction == str(label).strip()
