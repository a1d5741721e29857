"""benchmarks/bench_switch.py runs, and its old and new switch paths agree switch by switch."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_switch.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_switch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_switch_tiny(capsys):
    bench = load_bench()
    rows = bench.main(["--blocks", "2", "--switches", "3", "--repeats", "2"])
    # measure() first checks, with equal generators, that the paths draw and apply the same
    # configurations (it raises otherwise).
    assert [(r["adapters"], r["groups"]) for r in rows] == [(10, 10), (10, 6)]
    assert all(len(r["old"]) == len(r["new"]) == 2 for r in rows)
    assert "old/new" in capsys.readouterr().out


def test_old_path_is_a_real_baseline():
    """The copied old path draws from the same stream as the library and keeps partial
    configurations' other ranks, so the comparison is like for like."""
    import numpy as np

    bench = load_bench()
    model = bench.llama_tree(2, "paper")
    space = bench.search_space(model)
    a = bench.old_switch(model, space, np.random.default_rng(5))
    expected_rng = np.random.default_rng(5)
    assert a == {g: r[expected_rng.integers(len(r))] for g, r in space.items()}
    bench._old_set_config(model, {next(iter(space)): 16})
    assert bench._old_get_config(model) == {**a, next(iter(space)): 16}
