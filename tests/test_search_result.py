"""SearchResult: best, Pareto front, JSON round trip, and resuming without re-evaluating."""

from __future__ import annotations

import json
import math

import pytest
from test_search_objectives import SMALL, SPACE, Counting, deceptive, random_table

from shears.search import Evaluation, SearchResult, hill_climb, nsga2_search


def _key(config: dict) -> tuple:
    return tuple(sorted(config.items()))


def hand_result(maximize: bool = True) -> SearchResult:
    # (score, cost): (1, 10) (3, 30) (2, 20) (2, 25) (0, 5) (3, 40) (nan, 1)
    rows = [(1, 10), (3, 30), (2, 20), (2, 25), (0, 5), (3, 40), (math.nan, 1)]
    space = {"a": [7, 6, 5, 4, 3, 2, 1]}
    history = [Evaluation({"a": 7 - i}, float(s), params=100 * i, seconds=0.5, cost=float(c))
               for i, (s, c) in enumerate(rows)]
    return SearchResult(space, history, maximize=maximize, method="hand")


def test_best_is_the_first_of_ties_and_ignores_nan():
    result = hand_result()
    assert result.best_score == 3.0 and result.best_config == {"a": 6}
    low = hand_result(maximize=False)
    assert low.best_score == 0.0 and low.best_config == {"a": 3}


def test_pareto_front_matches_the_hand_computed_one():
    # maximise score, minimise cost: (0,5) (1,10) (2,20) (3,30) survive; (2,25) and (3,40)
    # are dominated, the NaN takes no part.
    front = hand_result().pareto_front
    assert [(e.score, e.cost) for e in front] == [(0, 5), (1, 10), (2, 20), (3, 30)]
    # minimising the score too, only the cheapest-and-lowest point is left
    assert [(e.score, e.cost) for e in hand_result(False).pareto_front] == [(0, 5)]


def test_pareto_front_falls_back_to_adapter_parameters():
    result = hand_result()
    result.history = [Evaluation(e.config, e.score, params=e.params) for e in result.history]
    assert [e.params for e in result.pareto_front] == [0, 100]  # (score 1, params 0) and (3, 100)


def test_json_round_trip(tmp_path):
    result = hand_result()
    result.settings = {"seed": 3, "reference_points": [[1.0, 2.0]]}
    result.save(tmp_path / "r.json")
    back = SearchResult.load(tmp_path / "r.json")
    assert back.space == result.space and back.method == "hand" and back.maximize
    assert back.settings == result.settings
    assert len(back.history) == len(result.history)
    for a, b in zip(back.history, result.history, strict=True):
        assert (a.config, a.params, a.seconds, a.cost) == (b.config, b.params, b.seconds, b.cost)
        assert a.score == b.score or (math.isnan(a.score) and math.isnan(b.score))
    assert json.loads((tmp_path / "r.json").read_text())["history"][0]["config"] == {"a": 7}


def _same(a: SearchResult, b: SearchResult) -> bool:
    return [(e.config, e.score) for e in a.history] == [(e.config, e.score) for e in b.history]


def test_resumed_hill_climb_retraces_and_spends_nothing_twice(tmp_path):
    whole = hill_climb(SPACE, deceptive, budget=120, seed=2, progress=False)
    first = hill_climb(SPACE, deceptive, budget=45, seed=2, progress=False)
    first.save(tmp_path / "hc.json")
    f = Counting(deceptive)
    resumed = hill_climb(SPACE, f, budget=120, seed=2, progress=False,
                         resume=tmp_path / "hc.json")
    assert _same(resumed, whole)
    assert len(f.calls) == 120 - 45 == f.distinct()
    assert not {_key(c) for c in f.calls} & {_key(e.config) for e in first.history}
    assert resumed.history[:45] == first.history  # wall times of the first run are kept


def test_resume_from_another_search_reuses_its_evaluations():
    f = Counting(random_table(SMALL, 4))
    earlier = nsga2_search(SMALL, f, cost=lambda c: sum(c.values()), population=6,
                           generations=1, progress=False)
    spent = len(f.calls)
    later = hill_climb(SMALL, f, budget=36, resume=earlier, progress=False)
    assert f.distinct() == len(f.calls) == 36  # the whole space, each config once
    assert len(later.history) == 36 and spent == len(earlier.history)
    assert later.history[:spent] == earlier.history


def test_resumed_nsga2_retraces_and_spends_nothing_twice(tmp_path):
    def cost(c):
        return float(sum(c.values()))

    kw = dict(cost=cost, population=8, seed=5, progress=False)
    whole = nsga2_search(SPACE, deceptive, generations=6, **kw)
    first = nsga2_search(SPACE, deceptive, generations=2, **kw)
    first.save(tmp_path / "ga.json")
    f = Counting(deceptive)
    resumed = nsga2_search(SPACE, f, generations=6, resume=tmp_path / "ga.json", **kw)
    assert _same(resumed, whole)
    assert len(f.calls) == len(whole.history) - len(first.history) == f.distinct() > 0
    assert not {_key(c) for c in f.calls} & {_key(e.config) for e in first.history}


def test_resume_refuses_another_space_or_direction():
    earlier = hill_climb(SMALL, random_table(SMALL, 0), budget=5, progress=False)
    with pytest.raises(KeyError):
        hill_climb(SPACE, deceptive, budget=10, resume=earlier, progress=False)
    with pytest.raises(ValueError) as error:
        hill_climb(SMALL, random_table(SMALL, 0), budget=10, maximize=False, resume=earlier,
                   progress=False)
    assert str(error.value) == (
        "cannot resume: the saved search maximised its score (maximize=True) but this one "
        "minimises it (maximize=False); pass maximize=True to continue it")
    lower = hill_climb(SMALL, random_table(SMALL, 0), budget=5, maximize=False, progress=False)
    with pytest.raises(ValueError) as error:
        nsga2_search(SMALL, random_table(SMALL, 0), cost=lambda c: 1.0, budget=10,
                     resume=lower, progress=False)
    assert str(error.value) == (
        "cannot resume: the saved search minimised its score (maximize=False) but this one "
        "maximises it (maximize=True); pass maximize=False to continue it")


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _same_float(a, b) -> bool:
    return type(a) is type(b) and (a == b or (math.isnan(a) and math.isnan(b)))


def test_json_is_standard_and_round_trips_non_finite_numbers_exactly(tmp_path):
    inf = math.inf
    space = {"a": [4, 3, 2, 1]}
    history = [Evaluation({"a": 4}, math.nan, params=1, seconds=0.25, cost=2.0),
               Evaluation({"a": 3}, inf, params=2, seconds=0.5, cost=inf),
               Evaluation({"a": 2}, -inf, seconds=math.nan),
               Evaluation({"a": 1}, 0.1 + 0.2, cost=-0.0)]
    result = SearchResult(space, history, method="hand",
                          settings={"reference_points": [[inf, 1.0], [0.5, -inf]],
                                    "epsilon": math.nan, "seed": 3, "start": None})
    result.save(tmp_path / "r.json")
    data = _strict_json((tmp_path / "r.json").read_text())  # no NaN/Infinity tokens
    assert [e["score"] for e in data["history"]][:3] == ["NaN", "Infinity", "-Infinity"]
    back = SearchResult.load(tmp_path / "r.json")
    for a, b in zip(back.history, history, strict=True):
        assert a.config == b.config and a.params == b.params
        assert _same_float(a.score, b.score) and _same_float(a.seconds, b.seconds)
        assert (a.cost is None and b.cost is None) or _same_float(a.cost, b.cost)
    assert math.copysign(1, back.history[3].cost) == -1.0  # -0.0 kept
    assert back.settings["reference_points"] == [[inf, 1.0], [0.5, -inf]]
    assert math.isnan(back.settings["epsilon"]) and back.settings["seed"] == 3
    assert back.best_score == inf and back.space == space


def test_files_written_with_bare_nan_tokens_still_load(tmp_path):
    result = hand_result()
    result.history.append(Evaluation({"a": 1}, math.inf, cost=-math.inf))
    (tmp_path / "old.json").write_text(json.dumps(result.to_dict(), indent=1))  # old writer
    assert "NaN" in (tmp_path / "old.json").read_text()
    back = SearchResult.load(tmp_path / "old.json")
    for a, b in zip(back.history, result.history, strict=True):
        assert _same_float(a.score, b.score) and a.cost == b.cost


def test_a_search_with_nan_scores_saves_standard_json_and_resumes(tmp_path):
    def judge(c):
        return math.nan if c["a"] == 2 else float(c["a"])

    first = hill_climb({"a": [4, 3, 2, 1]}, judge, budget=3, seed=0, progress=False)
    # from the heuristic 3, the climb evaluates its neighbours 2 (NaN) and 4
    assert [e.config["a"] for e in first.history] == [3, 2, 4]
    assert math.isnan(first.history[1].score)
    first.save(tmp_path / "hc.json")
    _strict_json((tmp_path / "hc.json").read_text())
    resumed = hill_climb({"a": [4, 3, 2, 1]}, judge, budget=4, seed=0, progress=False,
                         resume=tmp_path / "hc.json")
    assert [e.config for e in resumed.history[:3]] == [e.config for e in first.history]
    assert math.isnan(resumed.history[1].score) and resumed.best_config == {"a": 4}


def test_saved_file_holds_one_evaluation_per_line_and_the_same_data(tmp_path):
    result = hand_result()
    result.settings = {"seed": 3, "limit": math.inf, "points": [[1.0, math.nan]]}
    result.save(tmp_path / "r.json")
    text = (tmp_path / "r.json").read_text()
    def strict(token):
        raise AssertionError(f"bare {token} in the file: not standard JSON")

    data = json.loads(text, parse_constant=strict)
    expected = result.to_dict()
    expected["settings"] = {"seed": 3, "limit": "Infinity", "points": [[1.0, "NaN"]]}
    expected["history"][-1]["score"] = "NaN"
    assert data == expected
    lines = text.splitlines()
    assert sum('"config"' in line for line in lines) == len(result.history)
    assert sum(line.strip().startswith('"a": [') for line in lines) == 1
