"""Answer extraction and scoring: shears' rules (the default) and the reference's.

``rule="shears"``:

* math tasks: the last number of the response, commas removed; correct when within 1e-3
  of the label. No number means no answer.
* AQuA: a letter A-E: an explicit answer statement wins, then a parenthesised letter, then
  a response that is only a letter; otherwise no answer.
* commonsense tasks: the first word of the task's vocabulary (``true``/``false``,
  ``solution1``...), as a whole word and in lower case as the labels are written. The
  prompts list the choices capitalised ("Answer1: ..."), so a response that echoes them
  is not taken for an answer.

``rule="llm-adapters"``: what LLM-Adapters' evaluate.py (extract_answer_number,
extract_answer_letter) and commonsense_evaluate.py (extract_answer) do, and the authors'
Shears/run_math.py and run_commonsense.py with them, so that accuracies compare with the
paper's:

* math: the last match of ``-?\\d+\\.?\\d*`` after removing commas (no bare ".5": it reads
  5). No number scored ``inf`` there, never within 1e-3 of a label: here no answer.
* AQuA: the first capital A-E anywhere, so "Answer: (B)" gives A (the "A" of "Answer").
* commonsense: the first substring match of the task's words, case-sensitive, so
  "answer12" gives answer1 and "untrue" gives true.
"""

from __future__ import annotations

import re

from shears.evaluation.tasks import task_kind

RULES = ("shears", "llm-adapters")

# An optional minus, then digits with an optional fraction, or a bare fraction (".5").
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")
_NUMBER_REFERENCE = re.compile(r"-?\d+\.?\d*")  # evaluate.py:276
# "answer is (C)", "Answer: C", "answer is option E", "answer: (B)"
_LETTER_STATED = re.compile(r"(?i:answer)\s*(?:(?i:is)|:)?\s*(?i:option)?\s*\(?([A-E])\b")
_LETTER_PAREN = re.compile(r"\(([A-E])\)")
_LETTER_ALONE = re.compile(r"\(?([A-E])\)?[.:]?")
_LETTER_REFERENCE = re.compile(r"A|B|C|D|E")  # evaluate.py:292

Answer = float | str | None


def _last_number(text: str, pattern: re.Pattern = _NUMBER) -> float | None:
    found = pattern.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def _letter(text: str) -> str | None:
    for pattern in (_LETTER_STATED, _LETTER_PAREN):
        found = pattern.findall(text)
        if found:
            return found[-1]  # the last statement, like the last number of a math answer
    alone = _LETTER_ALONE.fullmatch(text.strip())
    return alone.group(1) if alone else None


def _first_word(text: str, vocabulary: tuple[str, ...], whole_word: bool = True) -> str | None:
    words = "|".join(map(re.escape, vocabulary))  # in the reference's order
    found = re.search(r"\b(" + words + r")\b" if whole_word else "(" + words + ")", text)
    return found.group(1) if found else None


def extract_answer(text: str, task: str, rule: str = "shears") -> Answer:
    """The answer in a model's response ``text`` for ``task``, or None when there is none.

    Returns a float for math tasks, a letter for AQuA, a vocabulary word for commonsense
    tasks. ``rule`` is ``"shears"`` or ``"llm-adapters"`` (the reference scripts', see the
    module docstring). Raises KeyError for an unknown task, ValueError for an unknown rule.
    """
    if rule not in RULES:
        raise ValueError(f"unknown answer rule {rule!r}; use one of "
                         + ", ".join(map(repr, RULES)))
    kind = task_kind(task)
    reference = rule == "llm-adapters"
    if kind == "math":
        return _last_number(text, _NUMBER_REFERENCE if reference else _NUMBER)
    if kind == "letter":
        if reference:
            found = _LETTER_REFERENCE.search(text)
            return found.group(0) if found else None
        return _letter(text)
    return _first_word(text, kind, whole_word=not reference)


def is_correct(prediction: Answer, label: str | float, task: str) -> bool:
    """Whether ``prediction`` (from :func:`extract_answer`) matches the record's ``label``."""
    if prediction is None:
        return False
    if task_kind(task) == "math":
        return abs(float(prediction) - float(label)) <= 1e-3
    return prediction == str(label).strip()
