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
    if not hasattr(losses, "result_figures"):
        pytest.skip("result_figures arrives with issue 12's fit changes")
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
