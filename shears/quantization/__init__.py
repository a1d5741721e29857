"""Stage 1b: a smaller base. Quantized bases for NLS (bitsandbytes NF4) and the INT4 grid of
QA-SparsePEFT (SQFT), built from the ecosystem's parts (the ``quant`` extra)."""

from .optional import require

__all__ = ["require"]
