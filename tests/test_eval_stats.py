"""Binomial interval and paired test for accuracies, against published and hand-computed values."""

import math

import pytest

from shears.evaluation.stats import mcnemar_exact, wilson_interval


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I,
# method 3 (Wilson score, no continuity correction), to the 4 decimals printed there.
@pytest.mark.parametrize(
    "k, n, lo, hi",
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
     (1, 29, 0.0061, 0.1718)],
)
def test_wilson_matches_newcombe_table(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=5e-5) and got[1] == pytest.approx(hi, abs=5e-5)


def test_wilson_by_hand():
    # 7/20, z = 1.959964: p = 0.35, z^2 = 3.841459, d = 1 + z^2/20 = 1.192073,
    # centre = (0.35 + z^2/40) / d = 0.446036 / 1.192073 = 0.374169,
    # half = z * sqrt(0.35 * 0.65 / 20 + z^2 / 1600) / d = z * 0.117371 / d = 0.192977
    lo, hi = wilson_interval(7, 20)
    assert lo == pytest.approx(0.374169 - 0.192977, abs=2e-6)
    assert hi == pytest.approx(0.374169 + 0.192977, abs=2e-6)


def test_wilson_edges_and_errors():
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(0, 0) == (0.0, 1.0)  # nothing measured: nothing known
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_wilson_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 7), (3, 50), (49, 51), (120, 306)]:
        ref = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_mcnemar_by_hand():
    # b = 1, c = 6: P(X <= 1) for X ~ Bin(7, 1/2) = (1 + 7) / 128; two-sided: 0.125
    assert mcnemar_exact(1, 6) == pytest.approx(0.125)
    assert mcnemar_exact(6, 1) == pytest.approx(0.125)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    assert math.isclose(mcnemar_exact(2, 12), 2 * (1 + 14 + 91) / 2**14)
