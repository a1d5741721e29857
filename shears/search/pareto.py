"""Multi-objective bookkeeping for NSGA-II and R-NSGA-II, in numpy; every objective minimised.

``F`` is an (n, m) array of objective vectors. Row ``i`` dominates row ``j`` when it is no
worse in every objective and strictly better in at least one (Deb et al. 2002). The
reference-point variant follows Deb & Sundar (2006): the *preference distance* replaces
the crowding distance, and an epsilon clearing keeps the solutions near a reference point
from collapsing onto one.
"""

from __future__ import annotations

import numpy as np


def domination_matrix(F: np.ndarray) -> np.ndarray:
    """``D[i, j]`` is True when row ``i`` dominates row ``j``."""
    le = (F[:, None, :] <= F[None, :, :]).all(axis=2)
    lt = (F[:, None, :] < F[None, :, :]).any(axis=2)
    return le & lt


def non_dominated_sort(F: np.ndarray) -> list[np.ndarray]:
    """Fronts of row indices: front 0 is non-dominated, front k is non-dominated once the
    fronts before it are removed (the fast non-dominated sort, vectorised)."""
    D = domination_matrix(F)
    dominated_by = D.sum(axis=0)  # how many rows dominate each row
    fronts = []
    current = np.flatnonzero(dominated_by == 0)
    while current.size:
        fronts.append(current)
        dominated_by = dominated_by - D[current].sum(axis=0)
        dominated_by[current] = -1  # removed; never selected again
        current = np.flatnonzero(dominated_by == 0)
    return fronts


def pareto_mask(F: np.ndarray) -> np.ndarray:
    """True for the rows that no other row dominates."""
    return ~domination_matrix(F).any(axis=0)


def crowding_distance(F: np.ndarray) -> np.ndarray:
    """Crowding distance of the rows of one front; the extremes of each objective get inf.

    Per objective, a row adds the normalised gap between its two sorted neighbours, so a
    larger value means a lonelier, more diversity-preserving solution.
    """
    n, m = F.shape
    distance = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for k in range(m):
        order = np.argsort(F[:, k], kind="stable")
        span = F[order[-1], k] - F[order[0], k]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span > 0 and np.isfinite(span):
            distance[order[1:-1]] += (F[order[2:], k] - F[order[:-2], k]) / span
    return distance


def preference_distance(
    F: np.ndarray,
    reference_points: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    epsilon: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """R-NSGA-II preference distance of the rows of one front (smaller is preferred).

    Objectives and reference points are normalised by ``upper - lower`` (the extent of the
    whole population). For each reference point the rows are ranked by Euclidean distance
    to it (closest = 0); a row's preference distance is its best rank over all reference
    points. Epsilon clearing: visiting the rows in random order, every row whose summed
    normalised objective difference to a visited, uncleared row is <= ``epsilon`` is pushed
    behind all uncleared rows, so near-duplicates do not crowd out the rest of the front.
    """
    span = np.where(upper > lower, upper - lower, 1.0)
    Z = (F - lower) / span
    R = (np.atleast_2d(reference_points) - lower) / span
    dist = np.linalg.norm(Z[None, :, :] - R[:, None, :], axis=2)  # (refs, rows)
    ranks = np.argsort(np.argsort(dist, axis=1, kind="stable"), axis=1, kind="stable")
    pref = ranks.min(axis=0).astype(float)

    n = len(F)
    cleared = np.zeros(n, dtype=bool)
    kept = np.zeros(n, dtype=bool)
    for i in rng.permutation(n):
        if cleared[i]:
            continue
        kept[i] = True
        close = np.abs(Z - Z[i]).sum(axis=1) <= epsilon
        cleared |= close & ~kept
    pref[cleared] += n  # "artificially large", yet ordered among the cleared
    return pref
