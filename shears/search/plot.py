"""One picture of a search: score against size for every sub-adapter it evaluated."""

from __future__ import annotations

import os

import numpy as np

from shears.adapters import heuristic_config, maximal_config, minimal_config
from shears.atomic import atomic_path

from .pareto import pareto_mask
from .result import Evaluation, SearchResult


def plot_search(result: SearchResult, path: str | os.PathLike | None = None,
                title: str | None = None):
    """Plot score against adapter parameters for every evaluated configuration.

    Points are coloured by evaluation order; the Pareto front is drawn as a step line,
    and the heuristic, maximal and minimal sub-adapters (when evaluated), the best one and
    any R-NSGA-II reference points are marked. The x axis is the search's cost when it had
    one, else the adapter parameters, else (a bare search space) the total rank.

    Args:
        result: a :class:`SearchResult`.
        path: where to save the figure (any format matplotlib knows, by extension).
        title: defaults to the method, the number of evaluations and the best score.

    Returns:
        The matplotlib ``Figure``.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_search needs matplotlib: pip install 'shears[plot]'") from e
    if not result.history:
        raise ValueError("nothing to plot: the search result holds no evaluation")

    x, xlabel = _x_axis(result)
    y = np.array([e.score for e in result.history], dtype=float)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself; no pyplot global state involved
    ax = fig.add_subplot()
    points = ax.scatter(x, y, c=np.arange(len(y)), cmap="viridis", s=22, alpha=0.8,
                        label="evaluated", zorder=2)
    fig.colorbar(points, ax=ax, label="evaluation #")
    _draw_front(ax, x, y, result.maximize)
    _mark_references(ax, result, x, y)
    if result.settings.get("reference_points"):
        refs = np.array(result.settings["reference_points"], dtype=float)  # (score, cost)
        ax.scatter(refs[:, 1], refs[:, 0], marker="x", c="black", s=70,
                   label="reference point", zorder=4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"score ({'higher' if result.maximize else 'lower'} is better)")
    best = result.best_score
    ax.set_title(title or f"{result.method or 'search'}: {len(y)} evaluations, best {best:.4g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if path is not None:  # atomically; the format from the target's extension (png default)
        fmt = os.path.splitext(os.fspath(path))[1][1:] or "png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format=fmt)
    return fig


def _x_axis(result: SearchResult) -> tuple[np.ndarray, str]:
    """The size of each evaluated sub-adapter, and the axis label."""
    costs = [e.objective_cost for e in result.history]
    if all(c is not None for c in costs):
        is_params = all(e.cost is None or e.cost == e.params for e in result.history)
        return np.array(costs, dtype=float), "adapter parameters" if is_params else "cost"
    return np.array([sum(e.config.values()) for e in result.history], dtype=float), "total rank"


def _draw_front(ax, x: np.ndarray, y: np.ndarray, maximize: bool) -> None:
    ok = ~np.isnan(y)
    F = np.column_stack([-y[ok] if maximize else y[ok], x[ok]])
    front = np.flatnonzero(ok)[pareto_mask(F)]
    front = front[np.argsort(x[front], kind="stable")]
    ax.plot(x[front], y[front], drawstyle="steps-post", c="tab:red", lw=1.2, zorder=1)
    ax.scatter(x[front], y[front], facecolors="none", edgecolors="tab:red", s=70,
               label="Pareto front", zorder=3)


def _mark_references(ax, result: SearchResult, x: np.ndarray, y: np.ndarray) -> None:
    """The paper's reference sub-adapters and the best one, where they were evaluated."""
    index = {_frozen(e): i for i, e in enumerate(result.history)}
    marks = [("heuristic", heuristic_config, "D", "tab:orange"),
             ("maximal", maximal_config, "^", "tab:blue"),
             ("minimal", minimal_config, "v", "tab:purple")]
    for label, make, marker, color in marks:
        i = index.get(tuple(sorted(make(result.space).items())))
        if i is not None:
            ax.scatter(x[i], y[i], marker=marker, c=color, s=80, label=label, zorder=4,
                       edgecolors="black")
    i = index[_frozen(result.best)]
    ax.scatter(x[i], y[i], marker="*", c="gold", s=220, label="best", zorder=5,
               edgecolors="black")


def _frozen(e: Evaluation) -> tuple:
    return tuple(sorted(e.config.items()))
