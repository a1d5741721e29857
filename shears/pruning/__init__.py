"""Stage 1: one-shot unstructured and N:M sparsification with Wanda (or magnitude)."""

from shears.pruning.calibration import calibration_data
from shears.pruning.layers import find_decoder_blocks, prunable_modules
from shears.pruning.masks import nm_mask, unstructured_mask, wanda_scores
from shears.pruning.wanda import wanda_prune

__all__ = [
    "calibration_data",
    "find_decoder_blocks",
    "nm_mask",
    "prunable_modules",
    "unstructured_mask",
    "wanda_prune",
    "wanda_scores",
]
