"""Searching a real (tiny) super-adapter: make_evaluator, adapter parameters, the plot."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_search_objectives import SPACE, deceptive
from tiny import make_tiny, random_ids

from shears.adapters import add_elastic_lora
from shears.search import (
    adapter_parameters,
    get_config,
    hill_climb,
    make_evaluator,
    nsga2_search,
    plot_search,
    search_space,
    set_config,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = add_elastic_lora(make_tiny("llama"), ["q_proj", "v_proj"], ranks=(8, 4, 2),
                             groups="layer")
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; give the sub-adapters different outputs
            torch.nn.init.normal_(p, std=0.5)
    return model


@torch.no_grad()
def neg_loss(model) -> float:
    ids = random_ids(2, 16, seed=1)
    return -float(model(input_ids=ids, labels=ids).loss)


def test_make_evaluator_activates_then_restores(model):
    before = get_config(model)
    seen = []
    evaluate = make_evaluator(model, lambda m: seen.append(get_config(m)) or 1.5)
    target = {g: ranks[-1] for g, ranks in search_space(model).items()}
    assert evaluate(target) == 1.5 and seen == [target]
    assert get_config(model) == before

    def boom(m):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        make_evaluator(model, boom)(target)
    assert get_config(model) == before


def test_hill_climb_on_a_model_matches_brute_force(model):
    space = search_space(model)
    brute = {}
    for ranks in itertools.product(*space.values()):  # independent: set, score, by hand
        config = dict(zip(space, ranks, strict=True))
        set_config(model, config)
        brute[ranks] = neg_loss(model)
    set_config(model, {g: r[0] for g, r in space.items()})

    result = hill_climb(model, make_evaluator(model, neg_loss), budget=len(brute),
                        progress=False)
    assert len(result.history) == len(brute) == 9
    assert result.best_score == pytest.approx(max(brute.values()), abs=1e-6)
    assert brute[tuple(result.best_config.values())] == pytest.approx(result.best_score)
    for e in result.history:
        assert e.params == adapter_parameters(model, e.config) and e.seconds > 0
    assert get_config(model) == {g: r[0] for g, r in space.items()}


def _is_png(path) -> bool:
    return path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_search_writes_a_png(tmp_path, model):
    pytest.importorskip("matplotlib")
    result = nsga2_search(model, make_evaluator(model, neg_loss), population=4, generations=2,
                          progress=False)
    fig = plot_search(result, tmp_path / "model.png")
    assert _is_png(tmp_path / "model.png")
    assert fig.axes[0].get_xlabel() == "adapter parameters"


def test_plot_search_on_bare_spaces_and_reference_points(tmp_path):
    pytest.importorskip("matplotlib")
    climb = hill_climb(SPACE, deceptive, budget=60, progress=False)
    assert plot_search(climb, tmp_path / "climb.png").axes[0].get_xlabel() == "total rank"
    assert _is_png(tmp_path / "climb.png")

    def cost(c):
        return float(sum(c.values()))

    rnsga = nsga2_search(SPACE, deceptive, cost=cost, population=12, generations=8,
                         reference_points=[(6.0, 150.0)], progress=False)
    labels = plot_search(rnsga, tmp_path / "rnsga.png").axes[0].get_legend_handles_labels()[1]
    assert {"Pareto front", "heuristic", "maximal", "minimal", "best",
            "reference point"} <= set(labels)
    assert _is_png(tmp_path / "rnsga.png")


def test_plot_search_without_matplotlib_says_how_to_get_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = hill_climb(SPACE, deceptive, budget=3, progress=False)
    with pytest.raises(ImportError, match=r"shears\[plot\]"):
        plot_search(result, "never-written.png")
