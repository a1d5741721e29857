"""Export stage: the ways out of shears (imports adapters and pruning, never the reverse).

- :func:`save_adapter` / :func:`load_adapter`: the whole super-adapter, shears' own format.
- :func:`export_peft`: one sub-adapter as a stock PEFT LoRA adapter.
- :func:`merge_adapters`: one sub-adapter merged into the base, exactly (and sparse for
  ``sparse_adapter=True`` adapters).
- :func:`export_compressed`: a merged model on its INT4 grid as a compressed-tensors checkpoint.
- :func:`load_grid`: the grid of ``quantize_base`` back onto a model reloaded with plain
  ``from_pretrained`` from a ``save_pretrained`` checkpoint (which saves the scales).
- :func:`to_semi_structured`: 2:4-sparse weights as CUDA semi-structured tensors.
"""

from .checkpoint import read_checkpoint_adapter
from .compressed import CompressedExport, export_compressed
from .merge import merge_adapters
from .peft_lora import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, export_peft
from .saved_grid import load_grid
from .saving import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_adapter_config, save_adapter
from .semi_structured import (
    check_semi_structured,
    semi_structured_backend,
    semi_structured_problems,
    to_semi_structured,
    two_four_violations,
)

__all__ = [
    "CONFIG_NAME",
    "CompressedExport",
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "check_semi_structured",
    "export_compressed",
    "export_peft",
    "load_adapter",
    "load_grid",
    "merge_adapters",
    "read_adapter_config",
    "read_checkpoint_adapter",
    "save_adapter",
    "semi_structured_backend",
    "semi_structured_problems",
    "to_semi_structured",
    "two_four_violations",
]
