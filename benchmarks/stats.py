"""Order statistics and a least-squares slope, in plain Python (no numpy needed for the numbers)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); `q` in [0, 100]."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """n, min, p50, p90, max and mean of `values` (NaN for an empty sample)."""
    if not values:
        return {"n": 0, "min": math.nan, "p50": math.nan, "p90": math.nan, "max": math.nan, "mean": math.nan}
    return {"n": len(values), "min": min(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "max": max(values), "mean": sum(values) / len(values)}


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys against xs (NaN with fewer than two distinct xs)."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        return math.nan
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def ratio(ours: float, stock: float) -> float:
    return ours / stock if stock and not math.isnan(stock) and not math.isnan(ours) else math.nan
