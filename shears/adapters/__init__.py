"""Stage 2a: elastic LoRA super-adapters, their injection and their search space.

Imports nothing from training, search or export (data flows one way).
"""

from .config import (
    adapter_parameters,
    get_config,
    heuristic_config,
    maximal_config,
    minimal_config,
    random_config,
    search_space,
    set_config,
)
from .index import (
    Config,
    ElasticIndex,
    SearchSpace,
    elastic_index,
    elastic_modules,
    validate_config,
)
from .inject import add_elastic_lora, match_targets
from .layer import ElasticLoRALinear
from .metadata import METADATA_KEY, adapter_layout, clear_adapter_metadata

__all__ = [
    "Config",
    "ElasticIndex",
    "ElasticLoRALinear",
    "METADATA_KEY",
    "SearchSpace",
    "adapter_layout",
    "adapter_parameters",
    "add_elastic_lora",
    "clear_adapter_metadata",
    "elastic_index",
    "elastic_modules",
    "get_config",
    "heuristic_config",
    "match_targets",
    "maximal_config",
    "minimal_config",
    "random_config",
    "search_space",
    "set_config",
    "validate_config",
]
