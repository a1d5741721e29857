"""Export stage: save and load super-adapters (imports adapters, never the reverse)."""

from .checkpoint import read_checkpoint_adapter
from .saving import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_adapter_config, save_adapter

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_adapter", "read_adapter_config",
           "read_checkpoint_adapter", "save_adapter"]
