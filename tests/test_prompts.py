"""The LLM-Adapters prompt template, written out here independently of the code."""

from shears.evaluation import format_prompt

NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
)
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
)


def test_without_input():
    assert format_prompt("Add 2 and 3.") == NO_INPUT
    assert format_prompt("Add 2 and 3.", input="") == NO_INPUT
    assert format_prompt("Add 2 and 3.", input=None, response=None) == NO_INPUT


def test_with_input():
    assert format_prompt("Add the numbers.", input="2 and 3") == WITH_INPUT


def test_response_is_appended_verbatim():
    # the training text is the evaluation prompt followed by the response, so the prompt is
    # a prefix of the training text (one canonical whitespace for both)
    out = format_prompt("Add 2 and 3.", response="\nA: 2 + 3 = 5. The answer is 5.")
    assert out == NO_INPUT + "\nA: 2 + 3 = 5. The answer is 5."


def test_stray_whitespace_in_instruction_is_canonicalised():
    # the data has instructions like " At the schools book fair ... ? "
    assert format_prompt("  Add 2 and 3. \n") == NO_INPUT
    assert format_prompt("Add the numbers.", input=" 2 and 3\n") == WITH_INPUT
    assert format_prompt("Add 2 and 3.", input="   ") == NO_INPUT
