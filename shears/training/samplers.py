"""Rank samplers of Neural Low-rank adapter Search (NLS).

A sampler is a callable ``(space, rng, step) -> config``: given the search space
(group -> descending ranks), a ``numpy.random.Generator`` shared by every process and the
optimizer step, it returns the sub-adapter to train in that step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from shears.adapters import Config, SearchSpace, maximal_config, minimal_config, random_config

Sampler = Callable[[SearchSpace, np.random.Generator, int], Config]


def uniform_sampler(space: SearchSpace, rng: np.random.Generator, step: int) -> Config:
    """Every group draws its rank uniformly and independently (the paper's NLS)."""
    return random_config(space, rng)


def sandwich_sampler(space: SearchSpace, rng: np.random.Generator, step: int) -> Config:
    """The sandwich rule spread over steps: maximal, minimal, then a uniform draw, in rotation.

    The two extremes bound every other sub-adapter, so training them regularly keeps the
    whole family of nested sub-adapters useful (as in BigNAS), at no extra cost per step.
    """
    if step % 3 == 0:
        return maximal_config(space)
    if step % 3 == 1:
        return minimal_config(space)
    return random_config(space, rng)


SAMPLERS: dict[str, Sampler] = {"uniform": uniform_sampler, "sandwich": sandwich_sampler}


def get_sampler(spec: str | Sampler) -> Sampler:
    """``"uniform"``, ``"sandwich"`` or a callable ``(space, rng, step) -> config``."""
    if callable(spec):
        return spec
    if spec not in SAMPLERS:
        raise ValueError(f"unknown NLS sampler {spec!r}; use one of {list(SAMPLERS)} or a callable")
    return SAMPLERS[spec]
