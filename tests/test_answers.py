"""Answer extraction and scoring on hand-written model outputs."""

import re

import pytest

from shears.evaluation import COMMONSENSE_TASKS, extract_answer, is_correct


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 42.", 42.0),
        ("She pays 1,250 + 250 = 1,500 dollars. The answer is 1,500.", 1500.0),
        ("It is 12,345,678", 12345678.0),
        ("The temperature drops to -7 degrees.", -7.0),
        ("5 - 12 = -7", -7.0),
        ("Each costs $2.50, so 4 cost $10.75.", 10.75),
        ("The answer is 18 dollars.", 18.0),
        ("He runs 3 miles a day for 7 days, 21 miles/week.", 21.0),
        ("half of it: .5", 0.5),
        ("The answer is 5.\n", 5.0),
        # the last number, as in the protocol, even from a question the model went on to write
        ("2 + 2 = 4\n\n### Instruction:\nWhat is 6 times 7?", 7.0),
    ],
)
def test_math_takes_the_last_number(text, expected):
    assert extract_answer(text, "gsm8k") == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "I do not know.", "The answer is five.", "-", "..."])
def test_math_without_number_has_no_answer(text):
    assert extract_answer(text, "gsm8k") is None
    assert not is_correct(extract_answer(text, "gsm8k"), "5.0", "gsm8k")


def test_math_tolerance_is_1e_3():
    assert is_correct(1.8333, "1.8333333333333335", "mawps")
    assert is_correct(576.0, "576.0", "gsm8k")
    assert is_correct(576.0, "576", "MultiArith")
    assert is_correct(-7.0, "-7", "SingleEq")
    assert not is_correct(1.832, "1.8333333333333335", "mawps")
    assert not is_correct(577.0, "576.0", "gsm8k")
    assert is_correct(extract_answer("The answer is 1,500.", "AddSub"), "1500", "AddSub")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer: C", "C"),  # the original took the first capital letter: A
        ("Rationale: A train covers 60 km. The answer is (D).", "D"),
        ("A man buys 3 apples. So the answer is B", "B"),
        ("The correct answer is option E.", "E"),
        ("(B)", "B"),
        ("C", "C"),
        ("E.", "E"),
        ("Among the choices, (A) 23.65 is too big; 1.23 is (D)", "D"),
        ("A man walks 3 km. Another walks 4 km.", None),  # an article is not an answer
        ("I Am Not Sure", None),
        ("", None),
    ],
)
def test_aqua_letter(text, expected):
    assert extract_answer(text, "AQuA") == expected


def test_aqua_scoring():
    assert is_correct("C", "C", "AQuA")
    assert not is_correct("A", "C", "AQuA")
    assert not is_correct(None, "C", "AQuA")


@pytest.mark.parametrize(
    "task, text, expected",
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "false. It is true that the law changed, but false overall", "false"),
        ("boolq", "that claim is untrue, so false", "false"),  # a whole word, not a substring
        ("boolq", "I cannot tell", None),
        ("piqa", "the correct answer is solution2", "solution2"),
        ("social_i_qa", "the correct answer is answer3 because answer3 fits", "answer3"),
        ("ARC-Easy", "the correct answer is answer2, not answer1", "answer2"),
        ("ARC-Challenge", "answer5", "answer5"),
        ("openbookqa", "Answer1: sunlight Answer2: rain the correct answer is answer2", "answer2"),
        ("openbookqa", "answer12", None),
        ("winogrande", "the correct answer is option1 option2", "option1"),
        ("hellaswag", "ending4 is the one", "ending4"),
        ("piqa", "answer1", None),  # not in piqa's vocabulary
    ],
)
def test_commonsense_first_vocabulary_word(task, text, expected):
    assert extract_answer(text, task) == expected


def test_commonsense_scoring():
    assert is_correct("true", "true", "boolq")
    assert not is_correct("false", "true", "boolq")
    assert not is_correct(None, "true", "boolq")


def test_unknown_task():
    with pytest.raises(KeyError, match="unknown task"):
        extract_answer("42", "nope")


# ---- rule="llm-adapters": the reference scripts' own extraction -------------------------------
# Transcribed from AGI-Edgerunners/LLM-Adapters (commit 8166572) evaluate.py:272-298
# (extract_answer_number, extract_answer_letter) and commonsense_evaluate.py:265-296
# (extract_answer), `args.dataset` replaced by a `dataset` argument and dead branches
# (a second `if not pred_answers`, a str check on a float) dropped. The authors'
# Shears/run_math.py:386-411 and Shears/run_commonsense.py:387-418 are the same code; their
# number list adds "mawps" (LLM-Adapters' raises NotImplementedError on it), kept here.

def reference_number(dataset: str, sentence: str) -> float:
    dataset = dataset.lower()
    if dataset in ["multiarith", "addsub", "singleeq", "gsm8k", "svamp", "mawps"]:
        sentence = sentence.replace(',', '')
        pred = [s for s in re.findall(r'-?\d+\.?\d*', sentence)]
        if not pred:
            return float('inf')
        pred_answer = float(pred[-1])
    else:
        raise NotImplementedError(f' not support dataset: {dataset}')
    return pred_answer


def reference_letter(sentence: str) -> str:
    sentence_ = sentence.strip()
    pred_answers = re.findall(r'A|B|C|D|E', sentence_)
    if pred_answers:
        return pred_answers[0]
    return ''


def reference_commonsense(dataset: str, sentence: str) -> str:
    patterns = {"boolq": r'true|false', "piqa": r'solution1|solution2',
                "social_i_qa": r'answer1|answer2|answer3|answer4|answer5',
                "ARC-Challenge": r'answer1|answer2|answer3|answer4|answer5',
                "ARC-Easy": r'answer1|answer2|answer3|answer4|answer5',
                "openbookqa": r'answer1|answer2|answer3|answer4|answer5',
                "hellaswag": r'ending1|ending2|ending3|ending4', "winogrande": r'option1|option2'}
    pred_answers = re.findall(patterns[dataset], sentence.strip())
    if not pred_answers:
        return ""
    return pred_answers[0]


def reference(text: str, task: str):
    """The reference's answer, with its 'no answer' values (inf, '') as None."""
    if task == "AQuA":
        return reference_letter(text) or None
    if task in COMMONSENSE_TASKS:
        return reference_commonsense(task, text) or None
    number = reference_number(task, text)
    return None if number == float("inf") else number


MATH_STRINGS = [
    "The answer is 42.", "She pays 1,250 + 250 = 1,500 dollars. The answer is 1,500.",
    "The temperature drops to -7 degrees.", "5 - 12 = -7", "Each costs $2.50, so 4 cost $10.75.",
    "half of it: .5",  # the reference has no bare fraction: 5 (shears: 0.5)
    "3.5.2", "x = -.25", "The answer is 5.\n", "2 + 2 = 4\n\n### Instruction:\nWhat is 6 times 7?",
    "", "I do not know.", "The answer is five.", "-", "...", "1e3 apples", "10:30",
]
LETTER_STRINGS = [
    "Answer: (B)", "The correct option is B", "The answer is 45 which is option C.",
    "Answer: C", "Rationale: A train covers 60 km. The answer is (D).", "(B)", "C", "E.",
    "A man walks 3 km. Another walks 4 km.", "I Am Not Sure", "", "the answer is (e)",
    "Dividing 12 by 4 gives 3. The answer is (E).", "  B  ", "F G H", "CD",
]
COMMONSENSE_STRINGS = [
    ("openbookqa", "answer12"), ("piqa", "Solution2"), ("piqa", "solution2"),
    ("piqa", "Solution1: x. the correct answer is solution2"),
    ("openbookqa", "Answer1: sunlight Answer2: rain the correct answer is answer2"),
    ("boolq", "that claim is untrue, so false"), ("boolq", "True"), ("boolq", "I cannot tell"),
    ("boolq", "the correct answer is true"), ("social_i_qa", "answer3 because answer3 fits"),
    ("ARC-Easy", "the correct answer is answer2, not answer1"), ("ARC-Challenge", "answer5"),
    ("winogrande", "option1 option2"), ("winogrande", "Option2"), ("hellaswag", "ending42"),
    ("hellaswag", "Ending3: no, ending4"), ("piqa", "answer1"), ("social_i_qa", "Answer3"),
]
TABLE = ([(t, s) for t in ("gsm8k", "mawps", "SVAMP", "AddSub", "MultiArith", "SingleEq")
          for s in MATH_STRINGS] + [("AQuA", s) for s in LETTER_STRINGS] + COMMONSENSE_STRINGS)


@pytest.mark.parametrize("task, text", TABLE)
def test_llm_adapters_rule_equals_the_reference_functions(task, text):
    assert extract_answer(text, task, rule="llm-adapters") == reference(text, task)


def test_the_reviews_examples_under_both_rules():
    both = [("Answer: (B)", "A", "B"), ("The correct option is B", "B", None),
            ("...answer is 45 which is option C.", "C", None)]
    for text, reference_rule, shears_rule in both:
        assert extract_answer(text, "AQuA", rule="llm-adapters") == reference_rule
        assert extract_answer(text, "AQuA", rule="shears") == shears_rule
    assert extract_answer("answer12", "openbookqa", rule="llm-adapters") == "answer1"
    assert extract_answer("answer12", "openbookqa") is None
    assert extract_answer("Solution2", "piqa", rule="llm-adapters") is None  # case-sensitive
    assert extract_answer("untrue", "boolq", rule="llm-adapters") == "true"
    assert extract_answer("half of it: .5", "gsm8k", rule="llm-adapters") == 5.0
    assert extract_answer("half of it: .5", "gsm8k") == 0.5


def test_the_rules_differ_on_the_table():
    """The table is not one on which the two rules happen to agree."""
    differ = [(t, s) for t, s in TABLE
              if extract_answer(s, t, rule="shears") != extract_answer(s, t, rule="llm-adapters")]
    assert {t for t, _ in differ} >= {"AQuA", "gsm8k", "openbookqa", "boolq"}


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="answer rule 'paper'.*'shears', 'llm-adapters'"):
        extract_answer("42", "gsm8k", rule="paper")
