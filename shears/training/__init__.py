"""Stage 2b: NLS training of elastic super-adapters (imports adapters, nothing later)."""

from .history import NLSHistory
from .samplers import SAMPLERS, Sampler, get_sampler, sandwich_sampler, uniform_sampler
from .trainer import NLS_STATE_NAME, NLSTrainer

__all__ = [
    "NLSHistory",
    "NLSTrainer",
    "NLS_STATE_NAME",
    "SAMPLERS",
    "Sampler",
    "get_sampler",
    "sandwich_sampler",
    "uniform_sampler",
]
