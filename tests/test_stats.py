"""eval/stats.py: Wilson's interval for one proportion, and the paired change between two gradings
of the same problems (Newcombe's hybrid score interval, exact McNemar)."""

import math
import random

import pytest

from nanoseek.eval.stats import Z95, mcnemar_exact_p, paired_difference, wilson_interval


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert abs(lo - 0.2366) < 1e-4 and abs(hi - 0.7634) < 1e-4
    z2 = Z95**2
    assert wilson_interval(0, 8) == (0.0, pytest.approx(z2 / (8 + z2)))
    assert wilson_interval(8, 8) == (pytest.approx(8 / (8 + z2)), 1.0)
    lo, hi = wilson_interval(150, 200)
    assert lo < 0.75 < hi and math.isclose(lo + hi, 2 * (0.75 + z2 / 400) / (1 + z2 / 200))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_mcnemar_exact_p_by_hand():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 0) == pytest.approx(2 / 32)  # all five discordant pairs one way
    assert mcnemar_exact_p(3, 3) == 1.0
    # 10 gained, 2 lost: 2 * P(X <= 2), X ~ Binomial(12, 1/2)
    assert mcnemar_exact_p(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_exact_p(2, 10) == mcnemar_exact_p(10, 2)


def _pairs(both: int, lost: int, gained: int, neither: int):
    before = [True] * both + [True] * lost + [False] * gained + [False] * neither
    after = [True] * both + [False] * lost + [True] * gained + [False] * neither
    return before, after


def test_paired_difference_counts_and_symmetry():
    before, after = _pairs(40, 10, 50, 100)
    r = paired_difference(before, after)
    assert (r["n"], r["gained"], r["lost"]) == (200, 50, 10)
    assert r["gain"] == pytest.approx(0.2) and r["before"] == 0.25 and r["after"] == 0.45
    lo, hi = r["interval95"]
    assert lo < 0.2 < hi and lo > 0  # a gain of 40 discordant pairs in 60 is clearly real
    assert r["mcnemar_p"] < 1e-6
    mirror = paired_difference(after, before)
    assert mirror["gain"] == pytest.approx(-0.2)
    assert mirror["interval95"] == pytest.approx((-hi, -lo))


def test_paired_difference_no_change_straddles_zero():
    before, after = _pairs(60, 15, 15, 110)
    r = paired_difference(before, after)
    lo, hi = r["interval95"]
    assert r["gain"] == 0 and lo < 0 < hi and r["mcnemar_p"] == 1.0


def test_paired_interval_is_narrower_than_unpaired_and_matches_a_paired_bootstrap():
    """Strongly correlated outcomes: the paired interval is much narrower than the difference of
    two independent Wilson intervals would be, and agrees with a paired bootstrap."""
    before, after = _pairs(70, 4, 16, 110)
    r = paired_difference(before, after)
    lo, hi = r["interval95"]
    wa = wilson_interval(86, 200)
    wb = wilson_interval(74, 200)
    assert hi - lo < (wa[1] - wa[0] + wb[1] - wb[0]) / 2
    rng = random.Random(0)
    pairs = list(zip(before, after, strict=True))
    gains = sorted(
        sum(a - b for b, a in (rng.choice(pairs) for _ in pairs)) / len(pairs) for _ in range(4000)
    )
    assert abs(gains[100] - lo) < 0.015 and abs(gains[3899] - hi) < 0.015


def test_paired_difference_rejects_mismatched_input():
    with pytest.raises(ValueError, match="same problems"):
        paired_difference([True, False], [True])
    with pytest.raises(ValueError):
        paired_difference([], [])
