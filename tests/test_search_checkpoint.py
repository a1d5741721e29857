"""checkpoint=: a search interrupted (exception, Ctrl-C, kill -9) keeps every evaluation
it made and resumes to the result of an uninterrupted run, evaluating nothing twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_search_objectives import SMALL, SPACE, Counting, deceptive, random_table

from shears.atomic import TMP_PREFIX
from shears.search import SearchResult, hill_climb, nsga2_search

TESTS = Path(__file__).parent


def total_rank(config: dict) -> float:
    return float(sum(config.values()))


def additive_estimate(config: dict) -> float:  # a deliberately rough prediction of deceptive
    return -float(sum(abs(r - 24) for r in config.values()))


SEARCHES = {
    "climb": lambda f, **kw: hill_climb(SPACE, f, budget=40, seed=2, progress=False, **kw),
    "ordered": lambda f, **kw: hill_climb(SPACE, f, budget=40, seed=2, progress=False,
                                          estimate=additive_estimate, **kw),
    "nsga2": lambda f, **kw: nsga2_search(SPACE, f, cost=total_rank, population=8,
                                          generations=4, seed=2, progress=False, **kw),
}


class Interrupt:
    """A judge that raises ``error`` on its ``at``-th call (counting from 1)."""

    def __init__(self, fn, at: int, error: BaseException) -> None:
        self.fn, self.at, self.error, self.calls = fn, at, error, []

    def __call__(self, config: dict) -> float:
        if len(self.calls) + 1 == self.at:
            raise self.error
        self.calls.append(dict(config))
        return self.fn(config)


def same_history(a: SearchResult, b: SearchResult) -> bool:
    return [(e.config, e.score, e.cost) for e in a.history] == [
        (e.config, e.score, e.cost) for e in b.history]


@pytest.mark.parametrize("search", list(SEARCHES))
@pytest.mark.parametrize("error", [RuntimeError("judge failed"), KeyboardInterrupt()])
def test_interrupted_search_keeps_every_evaluation_and_resumes_exactly(tmp_path, search, error):
    run = SEARCHES[search]
    full = run(deceptive)
    path = tmp_path / "search.json"
    judge = Interrupt(deceptive, at=13, error=error)
    with pytest.raises(type(error)):
        run(judge, checkpoint=path)
    saved = SearchResult.load(path)
    assert [e.config for e in saved.history] == judge.calls  # all 12 made, in order
    assert len(judge.calls) == 12
    assert [e.config for e in saved.history] == [e.config for e in full.history[:12]]
    assert saved.method == full.method and saved.settings == full.settings

    again = Counting(deceptive)
    resumed = run(again, checkpoint=path, resume=path)
    assert same_history(resumed, full)
    assert len(again.calls) == len(full.history) - 12  # nothing evaluated twice
    assert same_history(SearchResult.load(path), full)  # the final result is saved too


def test_checkpoint_after_every_evaluation(tmp_path):
    path = tmp_path / "c.json"
    lengths = []

    def judge(config):
        lengths.append(len(SearchResult.load(path).history) if path.exists() else 0)
        return deceptive(config)

    hill_climb(SPACE, judge, budget=10, checkpoint=path, progress=False)
    assert lengths == list(range(10))  # evaluation k sees the k evaluations before it
    assert len(SearchResult.load(path).history) == 10


def test_resume_from_the_checkpoint_path_before_it_exists_is_a_fresh_start(tmp_path):
    path = tmp_path / "new.json"
    result = hill_climb(SMALL, random_table(SMALL, 0), budget=5, checkpoint=path,
                        resume=path, progress=False)
    assert len(result.history) == 5 and path.exists()
    with pytest.raises(FileNotFoundError):
        hill_climb(SMALL, random_table(SMALL, 0), budget=5, resume=tmp_path / "other.json",
                   checkpoint=path, progress=False)


def test_resume_into_another_checkpoint_keeps_the_prior_history(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    with pytest.raises(RuntimeError):
        hill_climb(SPACE, Interrupt(deceptive, 8, RuntimeError()), budget=30, checkpoint=first,
                   progress=False)
    full = hill_climb(SPACE, deceptive, budget=30, progress=False)
    resumed = hill_climb(SPACE, deceptive, budget=30, resume=first, checkpoint=second,
                         progress=False)
    assert same_history(resumed, full) and same_history(SearchResult.load(second), full)
    assert len(SearchResult.load(first).history) == 7  # the first file is left as it was


@pytest.mark.parametrize("content", ['{"method": "hill_climb", "history": [{"con', "",
                                     '{"method": "hill_climb"}', "[1, 2]"])
def test_truncated_or_foreign_resume_file_names_the_file(tmp_path, content):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"search result {path}"):
        hill_climb(SMALL, random_table(SMALL, 0), resume=path, progress=False)
    with pytest.raises(ValueError, match="broken.json"):
        SearchResult.load(path)


def test_save_does_not_truncate_the_target_first(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    result = hill_climb(SMALL, random_table(SMALL, 0), budget=5, progress=False)
    result.save(path)
    before = path.read_bytes()

    def fail(*args):  # the write fails at the rename: the target must be untouched
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    longer = hill_climb(SMALL, random_table(SMALL, 0), budget=9, progress=False)
    with pytest.raises(OSError, match="disk full"):
        longer.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


# --- a real kill -9 ------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_search_objectives import SPACE, deceptive
    from shears.search import hill_climb, nsga2_search

    mode, at, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    calls = 0

    def judge(config):
        global calls
        calls += 1
        if mode == "judge" and calls == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return deceptive(config)

    if mode == "replace":  # die between the temporary file and its rename, on write `at`
        real, writes = os.replace, [0]

        def replace(src, dst):
            writes[0] += 1
            if writes[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)

        os.replace = replace
    if sys.argv[4] == "nsga2":
        nsga2_search(SPACE, judge, cost=lambda c: float(sum(c.values())), population=8,
                     generations=4, seed=2, progress=False, checkpoint=path)
    else:
        hill_climb(SPACE, judge, budget=40, seed=2, progress=False, checkpoint=path)
    print("finished")
""")


def run_child(tmp_path, mode: str, at: int, search: str) -> Path:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS)))
    path = tmp_path / "search.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(TESTS.parent), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), mode, str(at), str(path), search],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert "finished" not in proc.stdout
    return path


# Each child pays the import of torch and shears (seconds), so three cases, not six.
@pytest.mark.parametrize(("search", "mode", "at", "kept"), [
    ("climb", "judge", 9, 8),      # inside the judge at evaluation 9
    ("nsga2", "replace", 6, 5),    # inside the 6th checkpoint write, before its rename
    ("climb", "replace", 1, 0),    # inside the first write: no checkpoint exists yet
])
def test_sigkill_leaves_the_previous_complete_state_and_resumes(tmp_path, search, mode, at,
                                                                kept):
    run = SEARCHES[search]
    path = run_child(tmp_path, mode, at, search)
    full = run(deceptive)
    if kept == 0:  # killed before the first rename: no checkpoint, a fresh start
        assert not path.exists()
    else:
        json.loads(path.read_text())  # a whole file, never half of one
        saved = SearchResult.load(path)
        assert [e.config for e in saved.history] == [e.config for e in full.history[:kept]]
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert len(leftovers) == (mode == "replace")  # the unrenamed temporary file, if any
    again = Counting(deceptive)
    resumed = run(again, checkpoint=path, resume=path)
    assert same_history(resumed, full)
    assert len(again.calls) == len(full.history) - kept
