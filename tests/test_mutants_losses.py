"""The gap-closed figures on hand-made validation rows, where mutation testing
(bench/mutation.py) found gaps in the tests.

Rows are chosen so every figure is known by hand: the fitted model closes exactly half of
the base-to-teacher CE gap on every row, and has exactly half of the base's KL on every
row, so each bootstrap resample gives 0.5 and so do both intervals. Each test names the
mutants of src/steerdiff/fit/losses.py it kills; each was re-run with `mutmut run <name>`.
"""

from __future__ import annotations

import pytest
import torch

from steerdiff.fit import losses
from steerdiff.fit.losses import gap_closed, gap_figures

TOKENS = 10.0  # per row


def rows(ce: list[float], kl: list[float] | None) -> dict:
    """An `eval_losses` result: per-row [CE sum, KL sum, tokens] and the per-token means."""
    kls = kl if kl is not None else [0.0] * len(ce)
    t = torch.tensor([[c, k, TOKENS] for c, k in zip(ce, kls, strict=True)], dtype=torch.float64)
    out = {"rows": t, "ce": sum(ce) / (TOKENS * len(ce)), "n_tokens": int(TOKENS * len(ce))}
    if kl is not None:
        out["kl"] = sum(kl) / (TOKENS * len(ce))
    return out


BASE = rows([10, 12, 8, 10], [2, 3, 1, 2])  # CE 1.0, KL 0.2 per token
TEACHER = rows([6, 6, 4, 8], [0, 0, 0, 0])  # CE 0.6
FITTED = rows([8, 9, 6, 9], [1, 1.5, 0.5, 1])  # CE 0.8 (half the gap on every row), KL 0.1


def test_gap_closed_is_none_whenever_a_loss_is_missing_or_there_is_no_gap():
    """Catches: `or` turned into `and` in the None checks (a missing base, fitted or teacher
    loss then reaches the arithmetic and raises TypeError), and the no-gap check written
    on base + teacher (a zero gap then divides by zero)."""
    assert gap_closed(1.0, 0.8, 0.6) == pytest.approx(0.5)
    assert gap_closed(None, 0.8, 0.6) is None
    assert gap_closed(1.0, None, 0.6) is None
    assert gap_closed(1.0, 0.8, None) is None
    assert gap_closed(0.7, 0.5, 0.7) is None  # teacher no better than base: nothing to close


def test_gap_figures_with_teacher_and_top_k():
    """Catches: intervals computed when not asked for, the KL figures under other names, the
    KL interval dropped, and KL figures computed without the fitted model's KL."""
    plain = gap_figures(BASE, FITTED, TEACHER)
    assert plain == pytest.approx(
        {"gap_closed": 0.5, "val_kl": 0.1, "base_val_kl": 0.2, "kl_gap_closed": 0.5}
    )
    full = gap_figures(BASE, FITTED, TEACHER, intervals=True)
    assert set(full) == {*plain, "gap_closed_ci", "kl_gap_closed_ci"}
    assert full["gap_closed_ci"] == pytest.approx((0.5, 0.5))
    assert full["kl_gap_closed_ci"] == pytest.approx((0.5, 0.5))


def test_gap_figures_without_teacher_or_without_kl():
    """Catches: the teacher's CE read when there is no teacher (TypeError), an interval
    asked of gap_interval without a teacher, and KL figures made when only one side has KL
    or the base's KL is 0 (KeyError, division by zero)."""
    no_teacher = gap_figures(BASE, FITTED, None, intervals=True)
    assert no_teacher["gap_closed"] is None and no_teacher["gap_closed_ci"] is None
    assert no_teacher["kl_gap_closed"] == pytest.approx(0.5)
    no_kl = rows([8, 9, 6, 9], None)
    assert gap_figures(BASE, no_kl, TEACHER) == pytest.approx({"gap_closed": 0.5})
    zero_base_kl = {**BASE, "kl": 0.0}
    assert gap_figures(zero_base_kl, FITTED, TEACHER) == pytest.approx({"gap_closed": 0.5})


def test_result_figures_report_the_counts_and_gaps():
    """Catches: result.json's row and token counts, gaps in nats and noise flag taken from
    the wrong model or missing (the figures a reader needs to judge a gap-closed fraction)."""
    got = losses.result_figures(BASE, FITTED, TEACHER)
    assert got["n_val_rows"] == 4 and got["n_val_tokens"] == 40
    assert got["ce_gap"] == pytest.approx(0.4) and got["kl_gap"] == pytest.approx(0.2)
    assert got["ce_gap_within_noise"] is False  # 0.4 nats is well above the noise
    assert got["gap_closed_ci"] == pytest.approx((0.5, 0.5))
    close = rows([7.8, 8.8, 5.8, 8.8], None)  # CE 0.78: a 0.02-nat gap to FITTED's 0.8
    small = losses.result_figures(FITTED, FITTED, close)
    assert small["ce_gap"] == pytest.approx(0.02) and small["ce_gap_within_noise"] is True
    alone = losses.result_figures(BASE, FITTED, None)
    assert alone["ce_gap"] is None and alone["ce_gap_within_noise"] is None
    no_kl = rows([8, 9, 6, 9], None)
    assert losses.result_figures(BASE, no_kl, TEACHER)["kl_gap"] is None


def hand_kl_interval(b_kl: list[float], f_kl: list[float]) -> tuple[float, float]:
    """The documented paired percentile bootstrap of 1 - KL_fitted / KL_base, written out:
    2000 resamples of the rows (seed 0), resamples whose base KL is 0 left out."""
    idx = torch.randint(len(b_kl), (2000, len(b_kl)), generator=torch.Generator().manual_seed(0))
    bs = torch.tensor(b_kl, dtype=torch.float64)[idx].sum(1)
    fs = torch.tensor(f_kl, dtype=torch.float64)[idx].sum(1)
    stats = (1.0 - fs / bs)[bs > 0]
    lo, hi = torch.quantile(stats, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(lo), float(hi)


def test_kl_interval_resamples_rows_and_skips_resamples_without_base_kl():
    """Catches: the rows' KL summed over the whole table instead of per resample (one
    ratio, a zero-width interval), resamples whose base KL is 0 kept (0/0 makes the interval
    NaN), and a threshold of 1 instead of 0 on the base KL (small KL sums all dropped)."""
    b_kl, f_kl = [0.0, 0.4, 0.2, 0.6], [0.0, 0.1, 0.15, 0.3]
    base, fitted = rows([1, 1, 1, 1], b_kl), rows([1, 1, 1, 1], f_kl)
    lo, hi = losses.gap_interval(base, fitted)
    assert (lo, hi) == pytest.approx(hand_kl_interval(b_kl, f_kl), rel=1e-9)
    assert hi - lo > 0.1  # the per-row ratios differ (0.75, 0.25, 0.5): a real interval


def test_ce_interval_edge_cases():
    """Catches: one validation row treated as none (its interval is the point itself), no
    rows not caught before resampling, and the CE interval refused when the fitted model
    has no KL (a teacher is given, so CE needs no KL)."""
    one = [rows([10], None), rows([8], None), rows([6], None)]
    assert losses.gap_interval(*one) == pytest.approx((0.5, 0.5))
    empty = {"rows": torch.zeros(0, 3, dtype=torch.float64), "ce": 0.0, "n_tokens": 0}
    assert losses.gap_interval(empty, empty, empty) is None
    no_kl = rows([8, 9, 6, 9], None)
    assert losses.gap_interval(BASE, no_kl, TEACHER) == pytest.approx((0.5, 0.5))
    assert losses.gap_interval(BASE, no_kl) is None  # no teacher and no KL: nothing to report
