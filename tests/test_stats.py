"""evals.stats: Spearman's rho and bootstrap intervals, against scipy and hand values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from steerdiff.evals import StatsError, bootstrap_ci, ratio_ci, spearman, spearman_ci


def test_spearman_matches_scipy_with_ties():
    """Bug caught: ties ranked by order of appearance instead of sharing their mean rank
    (rho then drifts from scipy's 0.6854 on this tied data)."""
    x = [1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 8.0]
    y = [2.0, 1.0, 4.0, 4.0, 3.0, 9.0, 7.0, 6.0]
    want = sps.spearmanr(x, y).statistic
    assert spearman(x, y) == pytest.approx(want, abs=1e-12)
    assert spearman(x, y) == pytest.approx(0.6854, abs=1e-4)


def test_spearman_uses_ranks_not_values():
    """Bug caught: Pearson's r of the raw values. A monotone but curved relation has
    rho exactly 1 (and -1 reversed) while Pearson's r is 0.78."""
    x = np.arange(1.0, 9.0)
    y = np.exp(x)
    assert spearman(x, y) == pytest.approx(1.0, abs=1e-12)
    assert spearman(x, -y) == pytest.approx(-1.0, abs=1e-12)
    assert sps.pearsonr(x, y).statistic == pytest.approx(0.776, abs=0.001)


def test_spearman_ci_of_a_perfect_ranking_is_a_point():
    """Bug caught: resamples with all-tied x counted as rho 0 (or NaN kept), widening the
    interval of a perfectly monotone sample below 1."""
    res = spearman_ci([1, 2, 3], [10, 20, 25], n_boot=900, seed=1)
    assert res.rho == 1.0
    assert res.ci95 == (1.0, 1.0)
    assert res.n == 3
    # resamples of one repeated unit (3 of 27, so ~100 of 900) have no rho and are dropped
    assert 750 < res.n_boot < 850


def test_bootstrap_interval_matches_scipy_percentile():
    """Bug caught: resampling without replacement (a permutation: the interval collapses to
    the point estimate) or pairing broken between arrays. Compared with scipy's percentile
    bootstrap of the mean on 400 normal draws: both ~ mean +- 1.96 / sqrt(400)."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=400)
    (lo, hi), kept = bootstrap_ci(lambda a: float(a.mean()), data, n_boot=4000, seed=3)
    ref = sps.bootstrap((data,), np.mean, n_resamples=4000, method="percentile", random_state=3)
    assert kept == 4000
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.01)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.01)
    assert hi - lo == pytest.approx(2 * 1.96 / 20, abs=0.02)


def test_ratio_ci_keeps_pairs():
    """Bug caught: numerator and denominator resampled with different indices; then a
    constant per-unit ratio of 2 would get a wide interval instead of exactly (2, 2)."""
    den = [0.1, 0.5, 0.2, 0.9, 0.3]
    num = [2 * d for d in den]
    value, ci = ratio_ci(num, den, n_boot=300)
    assert value == pytest.approx(2.0)
    assert ci == pytest.approx((2.0, 2.0))


def test_bad_inputs_name_the_fix():
    with pytest.raises(StatsError, match="different lengths"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(StatsError, match="at least 2"):
        spearman([1], [1])
    with pytest.raises(StatsError, match="denominator"):
        ratio_ci([1, 2], [0, 0])
