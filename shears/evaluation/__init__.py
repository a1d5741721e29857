"""Judges of a model: perplexity, and (stage 3) generation accuracy and loss."""

from shears.evaluation.perplexity import perplexity

__all__ = ["perplexity"]
