"""The [whiten] stage of an experiment: Gaussians at hooks, and the vectors measured in them.

For each hook (cfg.whiten.hooks, default: the teacher's hook and every fitted vector set's
resid hooks) a Gaussian is fitted on `texts` corpus texts and saved in the stage folder
(gaussian_<hook>.safetensors). For the teacher's vector and each fitted vector set, per hook:
L2 norm, Mahalanobis norm, the data's spread along it, and how far off the data manifold the
steering pushes: the mean Mahalanobis distance from the data's mean of the activations at the
hook on `eval_texts` other corpus texts, unsteered and steered (h + coeff v), in whitened.json.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from ..interpret.corpus import load_corpus
from ..io import atomic_write_json, provenance
from ..models import LoadedModel
from ..vectors import VectorSet
from ..whiten import Gaussian, fit_gaussians, vector_figures
from .stages import RunState, StageResult, model_key, run_stage
from .whitened_teacher import teacher_vectors_in_units

WHITEN_FILE = "whiten.json"


def gaussian_file(hook: str) -> str:
    return f"gaussian_{hook}.safetensors"


def teacher_steering(state: RunState, lm: LoadedModel) -> VectorSet | None:
    """The teacher's steering as it generated (coeff x vector, in its coeff units), when the
    run has a steered teacher whose vector fits `lm`; else None."""
    t = state.cfg.teacher
    res = state.stages.get("teacher-vector-main")
    if res is None or t.kind != "steered" or state.cfg.student_model is not None:
        return None
    vs = teacher_vectors_in_units(t, lm, VectorSet.load(res.path / "teacher_vector.safetensors"))
    assert vs is not None
    return vs * t.coeff


@torch.no_grad()
def mean_distances(
    lm: LoadedModel,
    g: Gaussian,
    texts: list[str],
    max_tokens: int,
    vectors: VectorSet | None = None,
) -> list[float]:
    """Per text, the mean Mahalanobis distance from the data of the activations at g.hook over
    its tokens (the first left out), with `vectors` added (coeff 1): the set's other hooks
    steer the pass, its vector at g.hook is added to what the pass records there."""
    from ..chat import encode
    from ..hooks import steer
    from ..replay import hook_activations

    others = {h: v for h, v in (vectors or {}).items() if h != g.hook}
    own = (vectors or {}).get(g.hook)
    out = []
    dev = lm.device
    for text in texts:
        ids = encode(lm.tokenizer, text)[:max_tokens]
        if len(ids) < 2:
            continue
        with steer(lm.model, others) if others else nullcontext():
            x = hook_activations(lm.model, [g.hook], torch.tensor([ids], device=dev))[g.hook]
        if own is not None:
            x = x + own.to(x.dtype)
        out.append(float(g.distance(x).mean()))
    return out


def default_hooks(subjects: dict[str, VectorSet]) -> list[str]:
    """The teacher vector's hooks and the residual-stream hooks of every vector set, in order."""
    from ..hookpoints import RESIDUAL_SUFFIXES

    hooks = list(subjects.get("teacher-vector", {}))
    hooks += [
        h for vs in subjects.values() for h in vs if h.rsplit(".", 1)[-1] in RESIDUAL_SUFFIXES
    ]
    return list(dict.fromkeys(hooks))


def stage_whiten(
    state: RunState,
    lm: LoadedModel,
    fit_stages: list[StageResult],
    base_stages: list[StageResult],
) -> StageResult | None:
    """Fit the [whiten] Gaussians and measure the teacher vector and each fitted vector set in
    them (whiten.json: one row per (vector set, hook))."""
    from ..intervals import mean_ci95
    from .eval_stages import fitted_vectors

    cfg = state.cfg
    w = cfg.whiten
    assert w is not None
    subjects: dict[str, VectorSet] = {}
    teacher = teacher_steering(state, lm)
    if teacher is not None:
        subjects["teacher-vector"] = teacher
    subjects |= fitted_vectors(fit_stages)
    hooks = w.hooks or default_hooks(subjects)
    if not hooks:
        return None

    def fn(work: Path) -> dict:
        docs = load_corpus(n=w.texts + w.eval_texts, seed=cfg.seed).texts
        fit_texts, eval_texts = docs[: w.texts], docs[w.texts :]
        gs = fit_gaussians(lm, hooks, fit_texts, w.max_tokens, shrinkage=w.shrinkage, progress=True)
        for h, g in gs.items():
            g.save(work / gaussian_file(h))
        base = {h: mean_distances(lm, g, eval_texts, w.max_tokens) for h, g in gs.items()}
        rows = []
        for name, vs in subjects.items():
            for h in vs:
                if h not in gs:
                    continue
                steered = mean_distances(lm, gs[h], eval_texts, w.max_tokens, vs)
                m0, ci0 = mean_ci95(base[h])
                m1, ci1 = mean_ci95(steered)
                rows.append(
                    {
                        "name": name,
                        "hook": h,
                        **vector_figures(gs[h], vs[h]),
                        "distance_unsteered": m0,
                        "distance_unsteered_ci95": list(ci0),
                        "distance_steered": m1,
                        "distance_steered_ci95": list(ci1),
                        "n_texts": len(steered),
                    }
                )
        gaussians = {
            h: {
                "file": gaussian_file(h),
                "n_tokens": g.n_tokens,
                "shrinkage": g.shrinkage,
                "dim": g.dim,
                "trace": float(g.cov.trace()),
            }
            for h, g in gs.items()
        }
        atomic_write_json(
            work / WHITEN_FILE, {"config": w.model_dump(), "gaussians": gaussians, "results": rows}
        )
        return {"hooks": hooks, "n_results": len(rows)}

    dep = {
        "whiten": w.model_dump(),
        "hooks": hooks,
        "fits": [f.key for f in fit_stages],
        "teacher": state.stages["teacher-vector-main"].key if teacher is not None else None,
        "coeff": [cfg.teacher.coeff, cfg.teacher.coeff_units, cfg.teacher.whiten],
        "seed": cfg.seed,
        "model": model_key(lm),
    }
    prov = provenance(lm, w, cfg.seed)
    return state.add(run_stage(state.run_dir, "whiten", dep, fn, prov))
