"""Judges of a model: perplexity, generation accuracy (LLM-Adapters protocol) and loss,
and the binomial statistics that say how sure an accuracy is."""

from shears.evaluation.answers import extract_answer, is_correct
from shears.evaluation.data import InstructionCollator, instruction_dataset, tokenize_record
from shears.evaluation.generation import (
    EvalResult,
    evaluate_generation,
    generate_responses,
    generate_tokens,
)
from shears.evaluation.loss import evaluate_loss
from shears.evaluation.perplexity import perplexity
from shears.evaluation.prompts import format_prompt
from shears.evaluation.stats import mcnemar_exact, wilson_interval
from shears.evaluation.tasks import (
    COMMONSENSE_TASKS,
    MATH_TASKS,
    TASKS,
    drop_overlap,
    load_task,
    task_kind,
    task_name,
)

__all__ = [
    "COMMONSENSE_TASKS",
    "drop_overlap",
    "EvalResult",
    "evaluate_generation",
    "evaluate_loss",
    "extract_answer",
    "format_prompt",
    "generate_responses",
    "generate_tokens",
    "instruction_dataset",
    "InstructionCollator",
    "is_correct",
    "load_task",
    "MATH_TASKS",
    "mcnemar_exact",
    "perplexity",
    "task_kind",
    "task_name",
    "TASKS",
    "tokenize_record",
    "wilson_interval",
]
