"""The Alpaca-style prompt template of LLM-Adapters, with one canonical whitespace.

LLM-Adapters' ``generate_prompt`` (finetune.py, evaluate.py) writes the template inside an
indented triple-quoted string, so its prompts carry stray indentation that differs between
scripts. Here training and evaluation share a single template: the evaluation prompt is
exactly the training text up to and including ``"### Response:\\n"``.
"""

from __future__ import annotations

HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)


def format_prompt(instruction: str, input: str | None = None, response: str | None = None) -> str:
    """The LLM-Adapters prompt for ``instruction`` (and ``input``), followed by ``response``.

    Instruction and input are stripped (the data sets carry stray leading and trailing
    spaces); an empty or blank input selects the template without the Input section. The
    response is appended verbatim after ``"### Response:\\n"``; without one the result is the
    evaluation prompt that generation continues.
    """
    instruction = instruction.strip()
    input = (input or "").strip()
    if input:
        prompt = (
            f"{HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n"
            f"### Input:\n{input}\n\n### Response:\n"
        )
    else:
        prompt = f"{HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    return prompt + (response or "")
