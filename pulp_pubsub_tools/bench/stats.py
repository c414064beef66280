"""Percentiles and summaries; latencies are kept in seconds and reported in milliseconds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), interpolated linearly between ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, min, p50, p90, p99 and max of durations in seconds, as milliseconds."""
    if not values:
        return {"n": 0}
    ms = sorted(v * 1000 for v in values)
    return {
        "n": len(ms),
        "mean": round(sum(ms) / len(ms), 4),
        "min": round(ms[0], 4),
        "p50": round(percentile(ms, 50), 4),
        "p90": round(percentile(ms, 90), 4),
        "p99": round(percentile(ms, 99), 4),
        "max": round(ms[-1], 4),
    }


def quantiles_ms(values: Sequence[float], points: int = 101) -> list[float]:
    """``points`` evenly spaced percentiles in milliseconds: a CDF small enough for JSON."""
    if not values:
        return []
    ms = sorted(v * 1000 for v in values)
    return [round(percentile(ms, 100 * i / (points - 1)), 4) for i in range(points)]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator or math.isnan(numerator) or math.isnan(denominator):
        return None
    return round(numerator / denominator, 3)
