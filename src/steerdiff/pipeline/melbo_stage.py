"""The [melbo] stage of an experiment: MELBO unsupervised steering vectors on the student
model (steerdiff.melbo.run.run_melbo into the stage folder: vector_NN.safetensors,
melbo.json, melbo.png). Resumable per vector: an interrupted stage's .partial folder keeps
the finished vectors and the rerun trains only the rest.

When the run has a teacher vector with a vector at the MELBO source hook (a planted
behaviour), melbo.json also holds its recovery: |cos| of each MELBO vector with it vs
chance (steerdiff.melbo.evals.planted_recovery).
"""

from __future__ import annotations

from pathlib import Path

from ..io import provenance
from ..models import LoadedModel
from .fit_stages import teacher_vector
from .stages import RunState, StageResult, model_key, run_stage


def stage_melbo(
    state: RunState,
    lm: LoadedModel,
    fit_stages: list[StageResult],
    base_stages: list[StageResult],
) -> StageResult | None:
    """Run the [melbo] section (cfg.melbo) into the stage folder `melbo-KEY`."""
    from ..melbo.run import run_melbo

    m = state.cfg.melbo
    if m is None:
        return None
    vec = next(
        (s for s in state.stages.values() if s.kind == "teacher-vector" and s.tag == "main"), None
    )
    teacher = teacher_vector(vec)
    planted = teacher[m.source_hook] if teacher is not None and m.source_hook in teacher else None

    def fn(work: Path) -> dict:
        doc = run_melbo(lm, m, work, planted=planted)
        info = {
            "n_vectors": doc["training"]["n_vectors"],
            "radius": m.radius,
            "teacher_hooks": list(teacher) if teacher is not None else None,
        }
        if "evals" in doc:
            info["ranking"] = doc["evals"]["ranking"]
        if "planted" in doc:
            info["planted_best_cos"] = doc["planted"]["best_cos"]
        return info

    dep = {
        "melbo": m.model_dump(),
        "model": model_key(lm),
        "teacher_vector": vec.key if (vec is not None and planted is not None) else None,
    }
    return state.add(run_stage(state.run_dir, "melbo", dep, fn, provenance(lm, m, m.seed)))
