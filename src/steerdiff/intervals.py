"""The intervals evals and interpret both report: the mean of independent values with its
normal 95% interval (1.96 standard errors), and the percentile bootstrap over units."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def mean_ci95(values: Sequence[float]) -> tuple[float, tuple[float, float]]:
    """(mean, (lo, hi)): mean +- 1.96 x sd (n - 1) / sqrt(n); a zero-width interval for n < 2."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, (mean, mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    return mean, (mean - half, mean + half)


def summary(values: Sequence[float]) -> dict[str, Any]:
    """{"mean", "ci95", "n"}: mean_ci95 as the JSON results record it (per-question values)."""
    mean, ci = mean_ci95(list(values))
    return {"mean": mean, "ci95": list(ci), "n": len(values)}


def paired_arrays(*xs: Sequence[float], error: type[Exception] = ValueError) -> list[np.ndarray]:
    """The inputs as float64 arrays of one length without NaN; else `error` saying so."""
    arrs = [np.asarray(x, dtype=np.float64) for x in xs]
    n = {len(a) for a in arrs}
    if len(n) != 1:
        raise error(
            f"The inputs have different lengths {[len(a) for a in arrs]}; pass one value per "
            "unit (animal, question) in each, in the same order."
        )
    if any(np.isnan(a).any() for a in arrs):
        raise error("The inputs contain NaN; drop the units without a value first.")
    return arrs


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays: Sequence[float],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    error: type[Exception] = ValueError,
) -> tuple[tuple[float, float], int]:
    """Percentile interval of `statistic(*resampled)` over `n_boot` resamples of the rows
    (the same indices for every array: pairs stay paired). Returns (interval, kept): a
    resample whose statistic is not finite is dropped. Bad inputs raise `error` (the
    caller's SteerdiffError subclass)."""
    arrs = paired_arrays(*arrays, error=error)
    n = len(arrs[0])
    if n < 2:
        raise error(f"A bootstrap interval needs at least 2 units, got {n}.")
    if not 0 < level < 1:
        raise error(f"level must be between 0 and 1 (got {level}), e.g. 0.95.")
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        s = statistic(*(a[idx] for a in arrs))
        if math.isfinite(s):
            stats.append(s)
    if not stats:
        return (float("nan"), float("nan")), 0
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi)), len(stats)
