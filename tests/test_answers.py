"""Answer extraction and scoring on hand-written model outputs."""

import pytest

from shears.evaluation import extract_answer, is_correct


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
