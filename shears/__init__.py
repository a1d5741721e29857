"""shears: sparse base models and elastic low-rank super-adapters.

Stage 1 (pruning): :func:`calibration_data`, :func:`wanda_prune`, :func:`sparsity_report`.
"""

__version__ = "0.1.0"
