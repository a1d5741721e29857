"""The LLM-Adapters evaluation tasks: what kind of answer each expects, and their records.

A record is a dict with ``instruction``, ``input``, ``output`` and ``answer`` (all strings),
read from the unified JSON files ``<task>_<split>.json`` of the LLM-Adapters suite.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from shears.evaluation.paths import data_dir

# Kind of answer per task: "math" (a number), "letter" (AQuA, A-E), or a tuple of the
# commonsense vocabulary (the label is one of these words).
_ANSWERS5 = tuple(f"answer{i}" for i in range(1, 6))
TASKS: dict[str, str | tuple[str, ...]] = {
    "gsm8k": "math",
    "AQuA": "letter",
    "mawps": "math",
    "SVAMP": "math",
    "AddSub": "math",
    "MultiArith": "math",
    "SingleEq": "math",
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": _ANSWERS5,
    "hellaswag": tuple(f"ending{i}" for i in range(1, 5)),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": _ANSWERS5,
    "ARC-Challenge": _ANSWERS5,
    "openbookqa": _ANSWERS5,
}
MATH_TASKS = [t for t, kind in TASKS.items() if kind in ("math", "letter")]
COMMONSENSE_TASKS = [t for t, kind in TASKS.items() if isinstance(kind, tuple)]
_CANONICAL = {t.lower(): t for t in TASKS}


def task_name(name: str) -> str:
    """The canonical spelling of a task name (``"aqua"`` -> ``"AQuA"``); KeyError if unknown."""
    try:
        return _CANONICAL[name.lower()]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def task_kind(name: str) -> str | tuple[str, ...]:
    """``"math"``, ``"letter"``, or the tuple of answer words of a commonsense task."""
    return TASKS[task_name(name)]


def _adapters_dir(path: str | os.PathLike | None) -> Path:
    """The LLM-Adapters folder: ``path`` itself, or its ``llm-adapters/`` subfolder when
    ``path`` is the data root (as for the examples' ``--data``)."""
    base = data_dir(path)
    return base / "llm-adapters" if (base / "llm-adapters").is_dir() else base


def load_task(
    name: str,
    path: str | os.PathLike | None = None,
    split: str = "test",
    exclude: Iterable[dict] | None = None,
    limit: int | None = None,
) -> list[dict]:
    """Records of task ``name`` from ``<path>/<name>_<split>.json``.

    Args:
        name: a task of :data:`TASKS`, in any letter case.
        path: the folder of the LLM-Adapters JSON files (or the data root holding it as
            ``llm-adapters/``), or one JSON file; defaults to ``$SHEARS_DATA_DIR``.
        split: ``"test"`` or ``"train"``.
        exclude: training records; test records whose instruction also occurs there are
            dropped (see :func:`drop_overlap`), as held-out evaluation needs.
        limit: keep only the first ``limit`` records (after the exclusion).
    """
    name = task_name(name)
    base = _adapters_dir(path)
    file = base if base.suffix == ".json" else base / f"{name}_{split}.json"
    if not file.is_file():
        raise FileNotFoundError(f"task {name!r}: expected the LLM-Adapters file {file}")
    with open(file, encoding="utf-8") as f:
        records = json.load(f)
    if exclude is not None:
        records = drop_overlap(records, exclude)
    return records[:limit] if limit is not None else records


def _key(instruction: str) -> str:
    # Copies of one problem differ in spacing and punctuation ("2041 part-time employees ."
    # vs "2,041 part-time employees."), so only letters and digits are compared.
    return re.sub(r"[\W_]+", "", instruction.casefold())


def drop_overlap(records: Iterable[dict], training: Iterable[dict]) -> list[dict]:
    """``records`` without those whose instruction occurs in ``training``.

    Instructions are compared on their letters and digits only, case-folded. Needed because
    LLM-Adapters' math_data.json contains about 80% of the gsm8k, AQuA, AddSub, MultiArith
    and SingleEq test problems (and 134 of the 238 mawps ones, written differently).
    """
    seen = {_key(r["instruction"]) for r in training}
    return [r for r in records if _key(r["instruction"]) not in seen]
