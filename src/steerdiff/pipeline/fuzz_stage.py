"""The [fuzz] stage: activation fuzzing curves of the base model vs each fitted vector set
and each baseline of the run (or the one pair the table names), and which of each pair is
more readily pushed into the behaviour (steerdiff.fuzz.run_fuzz). fuzz.json and fuzz.png go
in the stage folder; each (model, scale, seed) is saved as it is done (work/parts), so an
interrupted stage resumes."""

from __future__ import annotations

from pathlib import Path

from ..fuzz import FuzzError, Variant, resolve_variant, run_fuzz
from ..interpret.variants import vector_context
from ..io import atomic_write_json, provenance
from ..models import LoadedModel
from .eval_stages import fitted_vectors
from .stages import RunState, StageResult, model_key, run_stage

FUZZ_FILE = "fuzz.json"


def run_variants(
    lm: LoadedModel, fit_stages: list[StageResult], base_stages: list[StageResult]
) -> dict[str, Variant]:
    """base, each baseline (its adapter or model folder) and each fitted vector set (coeff 1)."""
    out = {"base": resolve_variant(lm, "base")}
    for b in base_stages:
        out[b.name] = resolve_variant(lm, str(b.path))
    for name, vs in fitted_vectors(fit_stages).items():
        out[name] = Variant(name, "vectors", vector_context(lm, vs, 1.0), {"coeff": 1.0})
    return out


def stage_fuzz(
    state: RunState,
    lm: LoadedModel,
    fit_stages: list[StageResult],
    base_stages: list[StageResult],
) -> StageResult | None:
    """Run the [fuzz] section (cfg.fuzz): fuzz.json (curves, comparisons, provenance) and
    fuzz.png in the stage folder."""
    from ..report.fuzz import write_fuzz_png

    cfg = state.cfg.fuzz
    assert cfg is not None
    variants = run_variants(lm, fit_stages, base_stages)
    if cfg.pair is not None:
        chosen = {s: variants.get(s) or resolve_variant(lm, s) for s in cfg.pair}
        variants, pairs = chosen, [(cfg.pair[0], cfg.pair[1])]
    else:
        pairs = [("base", name) for name in variants if name != "base"]
    if not pairs:
        raise FuzzError("[fuzz] has nothing to compare: the run fits no vectors and trains no "
                        "baseline; name two models in [fuzz] pair.")  # fmt: skip

    def fn(work: Path) -> dict:
        result = run_fuzz(lm, variants, pairs, cfg, work)
        result["provenance"] = provenance(lm, cfg, seed=0)
        atomic_write_json(work / FUZZ_FILE, result)
        write_fuzz_png(result, work / "fuzz.png")
        return {"verdicts": [c["sentence"] for c in result["comparisons"]]}

    dep = {"fuzz": cfg.model_dump(), "model": model_key(lm), "pairs": pairs}
    dep["variants"] = {k: v.describe() for k, v in variants.items()}
    dep["stages"] = [s.key for s in [*fit_stages, *base_stages]]
    return state.add(run_stage(state.run_dir, "fuzz", dep, fn, provenance(lm, cfg, seed=0)))
