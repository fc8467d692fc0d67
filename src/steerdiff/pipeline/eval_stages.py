"""The stages that measure: the trait evaluation of every model in the run, and the
reading of the fitted vectors (DLA, the planted-vector check, similarity, the lens)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import atomic_write_json, provenance, read_json
from ..models import LoadedModel
from ..vectors import VectorSet
from .config import ExperimentConfig
from .fit_stages import never, teacher_vector
from .stages import RunState, StageResult, console, run_stage
from .whitened_teacher import teacher_vectors_in_units

RESIDUAL = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


@dataclass
class Subject:
    """One model to evaluate: the base, a teacher, or a student."""

    name: str
    role: str  # base | teacher | student | baseline
    lm: LoadedModel
    system_prompt: str | None = None
    vectors: VectorSet | None = None
    coeff: float = 1.0
    positions: str = "all"
    model: str = ""  # the base model it is compared with (its spec); default: lm's

    def __post_init__(self) -> None:
        self.model = self.model or self.lm.spec


def fitted_vectors(fit_stages: list[StageResult]) -> dict[str, VectorSet]:
    """The vectors of each fit stage, by its tag (`{fit name}-s{seed}`)."""
    return {f.tag or f.name: VectorSet.load(f.path / "vectors.safetensors") for f in fit_stages}


def make_subjects(
    cfg: ExperimentConfig,
    lm: LoadedModel,
    student_lm: LoadedModel,
    vec_main: StageResult | None,
    fit_stages: list[StageResult],
    base_stages: list[StageResult],
) -> list[Subject]:
    """Base model(s), the teachers as they generated, the fitted students, the baselines."""
    from ..teachers import load_adapted

    t = cfg.teacher
    subjects = [Subject("base", "base", lm)]
    if student_lm is not lm:
        subjects.append(Subject("student-base", "base", student_lm))
    if t.kind == "steered":
        subjects.append(
            Subject(
                "teacher (steered)",
                "teacher",
                lm,
                vectors=teacher_vectors_in_units(t, lm, teacher_vector(vec_main)),
                coeff=t.coeff,
                positions=t.positions,
            )
        )
    elif t.kind == "prompt":
        subjects.append(Subject("teacher (system prompt)", "teacher", lm, t.system_prompt_text()))
    if cfg.prompt_teacher is not None:
        prompt = cfg.prompt_teacher.system_prompt_text()
        subjects.append(Subject("prompt teacher", "teacher", lm, system_prompt=prompt))
    for name, vs in fitted_vectors(fit_stages).items():
        subjects.append(Subject(name, "student", student_lm, vectors=vs))
    for b in base_stages:  # fit_lora / fit_full wrote loadable folders
        adapted = load_adapted(b.path, student_lm)
        subjects.append(Subject(b.name, "baseline", adapted, model=student_lm.spec))
    return subjects


def evaluate(subject: Subject, cfg: ExperimentConfig) -> dict:
    """The trait preference of one subject (per-question rows dropped)."""
    from ..evals.preference import Steering, evaluate_preference

    steering = (
        Steering(subject.vectors, coeff=subject.coeff, positions=subject.positions)
        if subject.vectors is not None
        else None
    )
    category = cfg.teacher.category
    r = evaluate_preference(
        subject.lm,
        cfg.teacher.animal,
        "animals" if category == "animal" else category,
        scorer=cfg.eval.scorer,
        n_questions=cfg.eval.n_questions,
        n_samples=cfg.eval.n_samples,
        system_prompt=subject.system_prompt,
        steering=steering,
        seed=cfg.seed,
    )
    d = r.to_dict()
    # per question, only its target rate: what the report pairs with the same model's base
    d["per_question"] = [
        {"question": q["question"], "target_rate": q["target_rate"]} for q in d["per_question"]
    ]
    return {"name": subject.name, "role": subject.role, "model": subject.model, **d}


def stage_eval(state: RunState, subjects: list[Subject], dep: dict) -> StageResult:
    """Evaluate every subject; eval.json is rewritten after each, so a rerun resumes."""
    cfg = state.cfg

    def fn(work: Path) -> dict:
        done = {}
        path = work / "eval.json"
        if path.exists():
            done = {r["name"]: r for r in read_json(path)["results"]}
        for s in subjects:
            if s.name in done:
                continue
            console.print(f"  evaluating {s.name} ...")
            done[s.name] = evaluate(s, cfg)
            atomic_write_json(path, {"results": list(done.values())})  # resumable per subject
        return {"n_subjects": len(done)}

    dep = {**dep, "eval": cfg.eval.model_dump()}
    prov = provenance(subjects[0].lm, cfg.eval, cfg.seed)  # the base model's
    return state.add(run_stage(state.run_dir, "eval", dep, fn, prov))


def stage_read(
    state: RunState, lm: LoadedModel, vec_stage: StageResult | None, fit_stages: list[StageResult]
) -> StageResult:
    """DLA of the teacher and fitted vectors, planted cosine, lens, similarity."""
    from ..interpret import direct_logit_attribution, pairwise_mean_cosine, planted_check

    cfg = state.cfg
    t = cfg.teacher

    def fn(work: Path) -> dict:
        out: dict[str, Any] = {"dla": {}, "planted": [], "similarity": {}, "lens": None}
        teacher_vs = teacher_vectors_in_units(t, lm, teacher_vector(vec_stage))
        sets = fitted_vectors(fit_stages)
        planted = teacher_vs is not None and t.kind == "steered"
        with_teacher = {"teacher-vector": teacher_vs * t.coeff, **sets} if planted else sets
        for name, vs in with_teacher.items():
            for hook in vs:
                if hook.split(".", 2)[2] not in RESIDUAL:
                    continue
                for center in (True, False):
                    r = direct_logit_attribution(
                        lm, vs, hook=hook, k=cfg.read.dla_top_k, center=center
                    )
                    out["dla"][f"{name}|{hook}|{'centred' if center else 'raw'}"] = r.to_dict()
        if planted:  # a fit at the steered teacher's own hook should find its vector
            v_star = teacher_vs[t.hook] * t.coeff  # type: ignore[index]
            out["planted"] = planted_check(lm, t.hook, v_star, sets, k=20)
        # similarity between fitted sets that share hooks (e.g. seeds), and with the teacher vector
        out["similarity"] = pairwise_mean_cosine(with_teacher)
        if cfg.read.lens_texts > 0 and sets:
            out["lens"] = lens(lm, sets, work, cfg)
        atomic_write_json(work / "read.json", out)
        return {"n_dla": len(out["dla"]), "n_planted": len(out["planted"])}

    dep = {
        "fits": [f.key for f in fit_stages],
        "teacher_vector": vec_stage.key if vec_stage else None,
        "read": cfg.read.model_dump(),
    }
    prov = provenance(lm, cfg.read)
    return state.add(run_stage(state.run_dir, "read", dep, fn, prov, has_progress=never))


def lens(lm: LoadedModel, sets: dict[str, VectorSet], work: Path, cfg: ExperimentConfig) -> dict:
    """Activation-difference lens of the first fitted set on the default corpus."""
    from ..interpret import activation_difference_lens, save_lens
    from ..interpret.corpus import load_corpus
    from ..tasks.numbers import trait_words_for

    name, vs = next(iter(sets.items()))
    n = lm.model.config.num_hidden_layers
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in sorted({n // 2, (3 * n) // 4, n - 1})]
    corpus = load_corpus(None, n=cfg.read.lens_texts, seed=cfg.seed)
    result = activation_difference_lens(
        lm,
        corpus,
        vectors=vs,
        hooks=hooks,
        first_k=cfg.read.lens_first_k,
        max_tokens=cfg.read.lens_seq_len,
        progress=True,
    )
    readout = result.read(lm, k=20)
    save_lens(work / "lens", result, readout, model=lm)
    # the trait's words for the numbers task; documents / datasets have no trait to look for
    words = list(trait_words_for(cfg.teacher.animal)) if cfg.trait_eval else []
    return {
        "fit": name,
        "hooks": hooks,
        "n_texts": cfg.read.lens_texts,
        "seq_len": cfg.read.lens_seq_len,
        "first_hit": (readout.find(words) or [None])[0],
        "readout": readout.to_dict(),
    }
