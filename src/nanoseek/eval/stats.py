"""The statistics behind every accuracy figure nanoseek reports: a 95% interval for one proportion,
and for the change between two evaluations of the same problems.

    wilson_interval(k, n)
        Wilson's score interval of k successes in n trials:
        (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n),  p = k/n
    paired_difference(before, after)
        the same problems graded twice (e.g. after SFT and after GRPO): the gain after - before =
        (gained - lost)/n with Newcombe's hybrid score interval (his method 10, 1998), which builds
        on the two Wilson intervals and the correlation of the paired outcomes, and the exact
        McNemar test's two-sided p-value on the discordant pairs.

Paired, because an unpaired interval would throw away that both figures come from the same problems:
the discordant pairs alone carry the change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k/n (0, 1 when n == 0)."""
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    denom = 1 + z * z / n
    return max(0.0, (centre - spread) / denom), min(1.0, (centre + spread) / denom)


def mcnemar_exact_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: under 'no change' each of the gained + lost discordant
    pairs goes either way with probability 1/2."""
    m = gained + lost
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(gained, lost) + 1)) / 2**m
    return min(1.0, 2 * tail)


def paired_difference(before: Sequence[bool], after: Sequence[bool], z: float = Z95) -> dict:
    """The change in accuracy between two gradings of the same problems, in the same order.

    -> {n, before, after, gain, gained, lost, interval95: (lo, hi) of the gain, mcnemar_p}; the
    gain and its interval are fractions (0.12 = +12 points)."""
    if len(before) != len(after):
        raise ValueError(
            "paired_difference needs the same problems twice: "
            f"{len(before)} != {len(after)} results"
        )
    n = len(before)
    if n == 0:
        raise ValueError("paired_difference needs at least one problem")
    both = sum(1 for b, a in zip(before, after, strict=True) if b and a)
    lost = sum(1 for b, a in zip(before, after, strict=True) if b and not a)
    gained = sum(1 for b, a in zip(before, after, strict=True) if a and not b)
    neither = n - both - lost - gained
    p_after = (both + gained) / n
    p_before = (both + lost) / n
    lo_after, hi_after = wilson_interval(both + gained, n, z)
    lo_before, hi_before = wilson_interval(both + lost, n, z)
    # the correlation of the paired outcomes (phi of the 2x2 table); 0 where a margin is empty
    margins = (both + gained) * (lost + neither) * (both + lost) * (gained + neither)
    phi = (both * neither - gained * lost) / math.sqrt(margins) if margins else 0.0
    gain = p_after - p_before
    below = math.sqrt(
        max(
            0.0,
            (p_after - lo_after) ** 2
            - 2 * phi * (p_after - lo_after) * (hi_before - p_before)
            + (hi_before - p_before) ** 2,
        )
    )
    above = math.sqrt(
        max(
            0.0,
            (hi_after - p_after) ** 2
            - 2 * phi * (hi_after - p_after) * (p_before - lo_before)
            + (p_before - lo_before) ** 2,
        )
    )
    return {
        "n": n,
        "before": p_before,
        "after": p_after,
        "gain": gain,
        "gained": gained,
        "lost": lost,
        "interval95": (max(-1.0, gain - below), min(1.0, gain + above)),
        "mcnemar_p": mcnemar_exact_p(gained, lost),
    }
