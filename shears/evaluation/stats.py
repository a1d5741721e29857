"""How sure is an accuracy? A binomial interval for one, an exact paired test for two.

Accuracies of small models on a few hundred problems differ by a few points at most, so a
table of accuracies needs its uncertainty next to it.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``correct / n`` (95% by default).

    Unlike the Wald interval (p +- z sqrt(p(1-p)/n)) it stays inside [0, 1] and keeps its
    coverage near p = 0 or 1, where small models' accuracies live::

        centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)

    ``n = 0`` gives (0, 1): nothing was measured.
    """
    if n < 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for two judges scored on the same problems.

    ``b``: problems only the first got right; ``c``: only the second. Under "equally good"
    each of the ``b + c`` discordant problems is a fair coin, so the p-value is
    ``2 P(X <= min(b, c))`` for ``X ~ Bin(b + c, 1/2)``, capped at 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"counts must be non-negative, got b={b}, c={c}")
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)
