"""shears: sparse base models and elastic low-rank super-adapters (Shears, NAACL 2024).

1. Pruning: :func:`calibration_data`, :func:`wanda_prune`, :func:`sparsity_report`.
   1b. A smaller base: :func:`quantize_base` (INT4 grid; sparse adapters over it train
   quantization-aware, QA-SparsePEFT); :func:`load_grid` restores the grid a
   ``save_pretrained`` checkpoint saved.
2. Super-adapter: :class:`ElasticLoRALinear`, :func:`add_elastic_lora`, :class:`NLSTrainer`,
   configurations (:func:`search_space`, :func:`get_config`, :func:`set_config`, ...),
   :func:`save_adapter` / :func:`load_adapter`.
3. Sub-adapter search: :func:`heuristic_config`, :func:`rank_sensitivity` (every rank's
   estimated loss change from one backward pass per batch), :func:`allocate` /
   :func:`estimated_front` (the best estimate under a size budget), :func:`front_search`,
   :func:`hill_climb`, :func:`nsga2_search`,
   judged by :mod:`shears.evaluation` (:func:`evaluate_generation`, :func:`evaluate_loss`,
   :func:`perplexity`; :func:`format_prompt`, :func:`load_task`, :func:`instruction_dataset`).
4. The ways out (docs/deploy.md): :func:`export_peft` (a sub-adapter for stock PEFT),
   :func:`merge_adapters` (merged into the sparse base, zeros kept), :func:`to_semi_structured`
   (2:4 weights on CUDA), :func:`export_compressed` (INT4 compressed-tensors checkpoint of a
   model on its :func:`quantize_base` grid, QA-SparsePEFT adapters merged).
"""

from shears.adapters import (
    ElasticLoRALinear,
    adapter_parameters,
    add_elastic_lora,
    get_config,
    heuristic_config,
    maximal_config,
    minimal_config,
    random_config,
    search_space,
    set_config,
)
from shears.evaluation import (
    EvalResult,
    InstructionCollator,
    evaluate_generation,
    evaluate_loss,
    format_prompt,
    instruction_dataset,
    load_task,
    perplexity,
)
from shears.export import (
    export_compressed,
    export_peft,
    load_adapter,
    load_grid,
    merge_adapters,
    save_adapter,
    to_semi_structured,
)
from shears.pruning import calibration_data, wanda_prune
from shears.pruning.report import SparsityReport, sparsity_report
from shears.quantization import quantize_base
from shears.search import (
    RankSensitivity,
    SearchResult,
    allocate,
    confirm_pick,
    estimated_front,
    front_search,
    hill_climb,
    make_chunked_evaluator,
    make_evaluator,
    nsga2_search,
    plot_search,
    rank_sensitivity,
    stratified_batches,
)
from shears.training import NLSTrainer

__version__ = "0.1.0"

__all__ = [
    "ElasticLoRALinear",
    "EvalResult",
    "InstructionCollator",
    "NLSTrainer",
    "RankSensitivity",
    "SearchResult",
    "SparsityReport",
    "adapter_parameters",
    "add_elastic_lora",
    "allocate",
    "calibration_data",
    "evaluate_generation",
    "estimated_front",
    "evaluate_loss",
    "export_compressed",
    "export_peft",
    "format_prompt",
    "confirm_pick",
    "front_search",
    "instruction_dataset",
    "load_task",
    "perplexity",
    "get_config",
    "heuristic_config",
    "hill_climb",
    "load_adapter",
    "load_grid",
    "make_chunked_evaluator",
    "make_evaluator",
    "maximal_config",
    "merge_adapters",
    "minimal_config",
    "nsga2_search",
    "plot_search",
    "quantize_base",
    "random_config",
    "rank_sensitivity",
    "save_adapter",
    "search_space",
    "set_config",
    "stratified_batches",
    "sparsity_report",
    "to_semi_structured",
    "wanda_prune",
]
