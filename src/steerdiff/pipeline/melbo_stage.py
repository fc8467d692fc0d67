"""The [melbo] stage of an experiment (issue 16; placeholder, being written)."""

from __future__ import annotations

from ..models import LoadedModel
from .stages import RunState, StageResult


def stage_melbo(
    state: RunState,
    lm: LoadedModel,
    fit_stages: list[StageResult],
    base_stages: list[StageResult],
) -> StageResult | None:
    """Run the [melbo] section (cfg.melbo); placeholder: nothing yet."""
    return None
