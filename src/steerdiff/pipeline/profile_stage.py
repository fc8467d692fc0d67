"""The [profile] stage of an experiment: layer profiles of the trait vector (adding and
subtracting it) on the run's model and on the models the table names
(steerdiff.layer_profile), and optionally the perception-vs-behaviour probe.

The stage folder holds profile.json, profile.png (perception.png) and model_<i>.json per
model as it finishes: an interrupted stage resumes from the models already done.
"""

from __future__ import annotations

from pathlib import Path

from ..io import provenance
from ..models import LoadedModel
from .stages import RunState, StageResult, model_key, run_stage


def stage_profile(
    state: RunState,
    lm: LoadedModel,
    fit_stages: list[StageResult],
    base_stages: list[StageResult],
) -> StageResult | None:
    """Run the [profile] section (cfg.profile): the run's model first, then cfg.models."""
    from ..layer_profile import layer_profile
    from ..models import load_model

    cfg = state.cfg.profile
    assert cfg is not None
    cfg.check()

    def fn(work: Path) -> dict:
        models = [lm] + [
            load_model(name, dtype=state.cfg.dtype, device=state.cfg.device) for name in cfg.models
        ]
        res = layer_profile(models, cfg, progress=True, resume_dir=work)
        res.write(work)
        return {"peaks": res.to_dict()["peaks"]}

    dep = {"profile": cfg.model_dump(), "model": model_key(lm), "dtype": state.cfg.dtype}
    return state.add(run_stage(state.run_dir, "profile", dep, fn, provenance(lm, cfg, cfg.seed)))
