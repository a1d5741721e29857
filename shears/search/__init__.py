"""Stage 3: pick a sub-adapter from a trained super-adapter.

The O(1) heuristic (:func:`heuristic_config`, the middle of every rank list) and its
companions come from :mod:`shears.adapters`; :func:`hill_climb` and :func:`nsga2_search`
spend an evaluation budget to find a better sub-adapter, judged by ``evaluate(config)``
(see :func:`make_evaluator`). Both return a :class:`SearchResult`, which
:func:`plot_search` draws.
"""

from shears.adapters import (
    adapter_parameters,
    get_config,
    heuristic_config,
    maximal_config,
    minimal_config,
    random_config,
    search_space,
    set_config,
)

from .allocate import FrontPoint, allocate, estimated_front, rank_costs
from .chunked import ChunkedEvaluator, make_chunked_evaluator, stratified_batches
from .confirm import Confirmation, confirm_pick
from .evaluator import make_evaluator
from .front_search import front_search
from .hill_climb import hill_climb
from .nsga2 import nsga2_search
from .plot import plot_search
from .result import Evaluation, SearchResult
from .sensitivity import RankSensitivity, rank_sensitivity

__all__ = [
    "ChunkedEvaluator",
    "Confirmation",
    "Evaluation",
    "FrontPoint",
    "RankSensitivity",
    "SearchResult",
    "adapter_parameters",
    "allocate",
    "confirm_pick",
    "estimated_front",
    "front_search",
    "get_config",
    "heuristic_config",
    "hill_climb",
    "make_chunked_evaluator",
    "make_evaluator",
    "maximal_config",
    "minimal_config",
    "nsga2_search",
    "plot_search",
    "random_config",
    "rank_costs",
    "rank_sensitivity",
    "search_space",
    "set_config",
    "stratified_batches",
]
