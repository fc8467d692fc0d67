"""sweep.best_cell's off-target rule: the published "off-target rates <= 0.10" (rule "rate")
and the default rise-over-unsteered rule ("gain")."""

from __future__ import annotations

import pytest

from steerdiff.sweep import Cell, SweepConfig, SweepError, best_cell, off_target_figure


def _cell(strength: float, target: float, off_rate: float, off_gain: float) -> Cell:
    return Cell(
        "last",
        9,
        "blocks.9.hook_resid_post",
        strength,
        target,
        "lion",
        off_rate,
        off_gain,
        0.1,
        5.0,
    )


CELLS = [
    _cell(1.0, 0.05, 0.04, 0.01),
    _cell(2.0, 0.20, 0.09, 0.05),  # best within 0.10 under "rate"
    _cell(4.0, 0.35, 0.15, 0.08),  # higher target but off-target rate 0.15 > 0.10
    _cell(8.0, 0.60, 0.40, 0.30),  # out under both rules
]


def test_rate_rule_picks_best_strength_within_bound_and_skips_the_one_above():
    """Bug caught: the rule applied to the gain (strength 4 would win) or no bound at all
    (strength 8 would win)."""
    assert best_cell(CELLS, 0.10, None, "rate").strength == 2.0
    assert best_cell(CELLS, 0.10, None, "gain").strength == 4.0
    assert best_cell(CELLS, None, None, "rate").strength == 8.0
    assert best_cell(CELLS, 0.03, None, "rate") is None
    assert off_target_figure(CELLS[2], "rate") == 0.15
    assert off_target_figure(CELLS[2], "gain") == 0.08


def test_bound_is_inclusive():
    """Bug caught: '<' instead of '<=' drops a cell exactly at the bound."""
    assert best_cell([_cell(2.0, 0.2, 0.10, 0.10)], 0.10, None, "rate").strength == 2.0


def test_unknown_rule_is_an_error_naming_the_choices():
    with pytest.raises(SweepError, match="'gain'"):
        best_cell(CELLS, 0.1, None, "share")
    with pytest.raises(SweepError, match="off_target_rule 'share'"):
        SweepConfig(off_target_rule="share").check(30)  # type: ignore[arg-type]
