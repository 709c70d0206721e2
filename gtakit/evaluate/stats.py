"""Small statistics for the rates gtakit reports (passkey accuracy): how far a handful of trials can be trusted."""

from __future__ import annotations

import math


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a success rate (95% at the default z).

    Wilson rather than the normal approximation p +- z*sqrt(p(1-p)/n): with 20 trials a perfect or a null score
    is common, and there the normal interval collapses to width 0, claiming certainty that 20 trials do not give.
    """
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    rate = successes / trials
    spread = z * z / trials
    centre = (rate + spread / 2) / (1 + spread)
    half = z * math.sqrt(rate * (1 - rate) / trials + spread / (4 * trials)) / (1 + spread)
    # At 0 and n successes the bound is exactly 0 (or 1); rounding must not leave 1e-17 or 0.9999999999.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def rate_with_interval(rate: float, interval: tuple[float, float] | list[float]) -> str:
    """`85% [64-95]`: a rate and its interval in whole percent, for tables."""
    low, high = interval
    return f"{rate:.0%} [{low * 100:.0f}-{high * 100:.0f}]"
