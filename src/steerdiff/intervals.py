"""The mean of independent values and its normal 95% interval (1.96 standard errors): the
one interval evals (across questions) and interpret (across prompts) both report."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_ci95(values: Sequence[float]) -> tuple[float, tuple[float, float]]:
    """(mean, (lo, hi)): mean +- 1.96 x sd (n - 1) / sqrt(n); a zero-width interval for n < 2."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, (mean, mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    return mean, (mean - half, mean + half)
