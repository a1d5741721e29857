"""Stage 1b: a smaller base. Quantized bases for NLS (bitsandbytes NF4) and the INT4 grid of
QA-SparsePEFT (SQFT), built from the ecosystem's parts (the ``quant`` extra)."""

from .grid import dequantize, fake_quantize, fake_quantize_ste, group_scales, quantize
from .optional import require
from .qa import qa_linear, qa_merged_weight, qa_weight
from .quantize import (
    Grid,
    QuantizationReport,
    clear_grid,
    grid_of,
    quantize_base,
    quantized_modules,
)

__all__ = [
    "Grid",
    "QuantizationReport",
    "clear_grid",
    "dequantize",
    "fake_quantize",
    "fake_quantize_ste",
    "grid_of",
    "group_scales",
    "qa_linear",
    "qa_merged_weight",
    "qa_weight",
    "quantize",
    "quantize_base",
    "quantized_modules",
    "require",
]
