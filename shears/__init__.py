"""shears: sparse base models and elastic low-rank super-adapters (Shears, NAACL 2024).

Stage 1, pruning: :func:`calibration_data`, :func:`wanda_prune`, :func:`sparsity_report`.
"""

from shears.pruning import calibration_data, wanda_prune
from shears.report import SparsityReport, sparsity_report

__version__ = "0.1.0"

__all__ = ["SparsityReport", "calibration_data", "sparsity_report", "wanda_prune"]
