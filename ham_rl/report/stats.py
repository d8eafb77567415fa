"""Statistics for the report: Student-t quantiles, mean ± confidence interval, curves on a common step grid.

No scipy: the t quantile inverts the t CDF, integrated numerically (Simpson's rule) and solved by bisection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

__all__ = ["curves_on_grid", "mean_ci", "t_cdf", "t_quantile"]


def t_cdf(x: float, df: float) -> float:
    """CDF of Student's t distribution with df degrees of freedom at x (error below 1e-9 for df >= 1)."""
    if df <= 0:
        raise ValueError(f"`df` must be > 0, got {df}")
    if x == 0:
        return 0.5
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    u = np.linspace(0.0, math.atan(abs(x)), 4001)  # x = tan(u) makes the heavy tail smooth on a finite range
    t = np.tan(u)
    pdf = np.exp(log_norm - (df + 1) / 2 * np.log1p(t * t / df)) / np.cos(u) ** 2
    h = u[1] - u[0]
    area = h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())
    return 0.5 + math.copysign(area, x)


@lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t distribution: the x with t_cdf(x, df) = p, e.g. t_quantile(0.975, 2) = 4.3027."""
    if not 0 < p < 1:
        raise ValueError(f"`p` must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"`df` must be > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float, int]:
    """Mean, CI half-width (Student t, two-sided at `level`) and count of the finite values; half-width NaN if n < 2."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(x[0]), math.nan, 1
    half = t_quantile(0.5 + level / 2, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return float(x.mean()), half, n


def curves_on_grid(curves: Sequence[tuple[np.ndarray, np.ndarray]], num: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate (steps [N_i], values [N_i]) curves onto one step grid [num]; returns (grid, values [len(curves), num]).

    Each curve is defined only between its first and last finite point; outside that it is NaN, not extrapolated, so
    a grid point late in training averages only the seeds that reached it.
    """
    cleaned = []
    for steps, values in curves:
        ok = np.isfinite(steps) & np.isfinite(values)
        cleaned.append((steps[ok], values[ok]))
    if not any(s.size for s, _ in cleaned):
        return np.empty(0), np.empty((len(curves), 0))
    start = min(float(s[0]) for s, _ in cleaned if s.size)
    stop = max(float(s[-1]) for s, _ in cleaned if s.size)
    grid = np.linspace(start, stop, num)
    out = np.full((len(cleaned), num), np.nan)
    for i, (steps, values) in enumerate(cleaned):
        if not steps.size:
            continue
        inside = (grid >= steps[0]) & (grid <= steps[-1])
        out[i, inside] = np.interp(grid[inside], steps, values)
    return grid, out
