"""Stage 1b: a smaller base. Quantized bases for NLS (bitsandbytes NF4) and the INT4 grid of
QA-SparsePEFT (SQFT), built from the ecosystem's parts (the ``quant`` extra)."""

from .grid import dequantize, fake_quantize, fake_quantize_ste, group_scales, quantize
from .optional import require
from .qa import qa_linear, qa_merged_weight, qa_weight
from .quantize import QuantizationReport, quantize_base
from .record import (
    Grid,
    check_scales,
    clear_grid,
    grid_of,
    grid_record,
    grid_state,
    quantized_modules,
    recorded_grid,
)

__all__ = [
    "Grid",
    "QuantizationReport",
    "check_scales",
    "clear_grid",
    "dequantize",
    "fake_quantize",
    "fake_quantize_ste",
    "grid_of",
    "grid_record",
    "grid_state",
    "group_scales",
    "qa_linear",
    "qa_merged_weight",
    "qa_weight",
    "quantize",
    "quantize_base",
    "quantized_modules",
    "recorded_grid",
    "require",
]
