"""Small statistics for comparing traits: rank correlation and bootstrap intervals.

    spearman(x, y)                      -> Spearman's rho (average ranks for ties)
    bootstrap_ci(stat, *arrays)         -> a percentile interval, resampling rows jointly
    spearman_ci(x, y)                   -> SpearmanResult(rho, ci95, n, n_boot)
    ratio_ci(num, den)                  -> mean(num) / mean(den) with a paired bootstrap interval

Bootstrap intervals resample the units (animals, questions) with replacement, seeded, so
the same call gives the same interval. A resample whose statistic is undefined (all ranks
tied, a zero denominator) is dropped; `n_boot` counts the resamples kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .. import intervals
from ..errors import SteerdiffError
from ..intervals import paired_arrays


class StatsError(SteerdiffError, ValueError):
    """Inputs a statistic cannot use; the message says what to pass instead."""


def _arrays(*xs: Sequence[float]) -> list[np.ndarray]:
    return paired_arrays(*xs, error=StatsError)


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n; tied values share the average of their ranks."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.arange(1, len(a) + 1)
    for v in np.unique(a):
        tied = a == v
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the ranks (NaN if either is constant)."""
    a, b = _arrays(x, y)
    if len(a) < 2:
        raise StatsError(f"Spearman's rho needs at least 2 pairs, got {len(a)}.")
    ra, rb = rankdata(a) - (len(a) + 1) / 2, rankdata(b) - (len(b) + 1) / 2
    den = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays: Sequence[float],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[tuple[float, float], int]:
    """Percentile interval of `statistic(*resampled)` over `n_boot` resamples of the rows
    (the same indices for every array: pairs stay paired). Returns (interval, kept).
    (steerdiff.intervals.bootstrap_ci, raising StatsError.)"""
    return intervals.bootstrap_ci(
        statistic, *arrays, n_boot=n_boot, level=level, seed=seed, error=StatsError
    )


@dataclass
class SpearmanResult:
    rho: float
    ci95: tuple[float, float]  # percentile bootstrap over units
    n: int  # units (e.g. animals)
    n_boot: int  # resamples kept (ties-only resamples have no rho)

    def to_dict(self) -> dict:
        return asdict(self)


def spearman_ci(
    x: Sequence[float], y: Sequence[float], n_boot: int = 2000, seed: int = 0
) -> SpearmanResult:
    """Spearman's rho with a 95% percentile bootstrap interval over the pairs."""
    rho = spearman(x, y)

    def stat(a: np.ndarray, b: np.ndarray) -> float:
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            return float("nan")
        return spearman(a, b)

    ci, kept = bootstrap_ci(stat, x, y, n_boot=n_boot, seed=seed)
    return SpearmanResult(rho, ci, len(list(x)), kept)


def ratio_ci(
    num: Sequence[float], den: Sequence[float], n_boot: int = 2000, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """mean(num) / mean(den) with a paired percentile bootstrap interval over the units
    (e.g. per-question steered and prompted shares of the same questions)."""
    a, b = _arrays(num, den)
    if b.mean() == 0:
        raise StatsError("The denominator's mean is 0; the ratio is undefined.")

    def stat(x: np.ndarray, y: np.ndarray) -> float:
        m = y.mean()
        return float(x.mean() / m) if m != 0 else float("nan")

    ci, _ = bootstrap_ci(stat, a, b, n_boot=n_boot, seed=seed)
    return float(a.mean() / b.mean()), ci
