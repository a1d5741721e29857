"""confirm_pick: a search's pick replaces the reference only if it also wins on records the
search never saw. Judges here are hand-written tables, so the expected pick is known."""

import math

import pytest

from shears.search import Evaluation, SearchResult, confirm_pick

SPACE = {"g0": [4, 2], "g1": [4, 2]}
REF = {"g0": 2, "g1": 4}
A = {"g0": 4, "g1": 2}
B = {"g0": 2, "g1": 2}


def result(scores: dict[str, float], params: dict[str, int] | None = None) -> SearchResult:
    configs = {"ref": REF, "a": A, "b": B}
    params = params or {"ref": 12, "a": 12, "b": 8}
    return SearchResult(space=SPACE, maximize=False, method="front_search", history=[
        Evaluation(configs[k], s, params=params[k]) for k, s in scores.items()])


def judge(table: dict[str, float], calls: list):
    names = {str(sorted(c.items())): k for k, c in (("ref", REF), ("a", A), ("b", B))}

    def evaluate(config):
        calls.append(names[str(sorted(config.items()))])
        return table[names[str(sorted(config.items()))]]
    return evaluate


def test_a_pick_that_loses_on_fresh_records_gives_the_reference_back():
    calls: list = []
    found = result({"ref": 0.60, "a": 0.58, "b": 0.59})  # the search prefers a, then b
    c = confirm_pick(found, judge({"ref": 0.70, "a": 0.71, "b": 0.72}, calls), REF)
    assert c.config == REF and not c.accepted and c.score == 0.70
    assert calls == ["ref", "a"]  # top=1: the reference and the search's best only
    assert c.scores == {"reference": 0.70, "candidates": [0.71]}


def test_the_best_of_the_top_on_fresh_records_wins_when_it_beats_the_reference():
    calls: list = []
    found = result({"ref": 0.60, "a": 0.58, "b": 0.59})
    c = confirm_pick(found, judge({"ref": 0.70, "a": 0.71, "b": 0.69}, calls), REF, top=2)
    assert c.config == B and c.accepted and math.isclose(c.score, 0.69)
    assert c.search_score == 0.59 and calls == ["ref", "a", "b"]


def test_margin_candidates_no_better_than_the_reference_and_max_params():
    calls: list = []
    found = result({"ref": 0.60, "a": 0.58, "b": 0.61})  # b does not beat ref on the search
    c = confirm_pick(found, judge({"ref": 0.70, "a": 0.699, "b": 0.5}, calls), REF, top=2,
                     margin=0.005)
    assert c.config == REF and not c.accepted and calls == ["ref", "a"]
    calls.clear()
    c = confirm_pick(found, judge({"ref": 0.70, "a": 0.6, "b": 0.5}, calls), REF,
                     max_params=10)  # a is too large; b is no better on the search judge
    assert c.config == REF and calls == []


def test_maximising_scores_and_errors():
    found = result({"ref": 0.30, "a": 0.40, "b": 0.35})
    found.maximize = True
    c = confirm_pick(found, judge({"ref": 0.5, "a": 0.6, "b": 0.0}, []), REF)
    assert c.config == A and c.accepted
    with pytest.raises(ValueError, match="top"):
        confirm_pick(found, judge({}, []), REF, top=0)
    with pytest.raises(ValueError, match="margin"):
        confirm_pick(found, judge({}, []), REF, margin=-1)
