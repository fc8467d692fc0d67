"""The stages that make things: the teacher's vector, the teacher's dataset, the fits and
the LoRA / full-finetune baselines. Each is one call into the library, cached by
`run_stage` under everything it depends on."""

from __future__ import annotations

from pathlib import Path

from ..hooks import get_hook_point, select_hooks, steer
from ..io import provenance, read_json
from ..models import LoadedModel
from ..teachers import Teacher, build_teacher
from ..vectors import VectorSet
from .config import BaselineSpec, FitSpec, TeacherConfig
from .stages import RunState, StageResult, model_key, run_stage

VECTOR_FILE = "teacher_vector.safetensors"
DATA_FILE = "data.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"  # what fit / fit_lora / fit_full resume from


def needs_vector(t: TeacherConfig) -> bool:
    """Steered teachers add the vector; the necessity check projects it out."""
    return t.kind == "steered" or (t.kind == "prompt" and t.ablate_from_hook)


def teacher_hooks(lm: LoadedModel, t: TeacherConfig) -> list[str]:
    """The hook the teacher vector lives at; for the necessity check, that layer onward."""
    if not t.ablate_from_hook:
        return [t.hook]
    hp = get_hook_point(lm.model, t.hook)
    return select_hooks(lm.model, f"blocks.{hp.layer}-.{hp.suffix}")


def teacher_vector(res: StageResult | None) -> VectorSet | None:
    """The vector a teacher-vector stage saved (None when there was no such stage)."""
    return None if res is None else VectorSet.load(res.path / VECTOR_FILE)


def data_path(res: StageResult) -> Path:
    return res.path / DATA_FILE


def data_source(res: StageResult) -> str | Path:
    """What a fit reads: the data stage's data.jsonl, or the dataset a `dataset` task's
    stage recorded (a path or hf:ORG/NAME[:split]; nothing copied)."""
    return res.info.get("source") or data_path(res)


def stage_teacher_vector(
    state: RunState, lm: LoadedModel, t: TeacherConfig, tag: str
) -> StageResult | None:
    """The contrast vector (trait system prompt vs none) for a steered / ablating teacher."""
    if not needs_vector(t):
        return None
    from ..extract import trait_vectors

    hooks = teacher_hooks(lm, t)

    def fn(work: Path) -> dict:
        if t.vectors:
            vs = VectorSet.load(t.vectors, model=lm)
        else:
            vs = trait_vectors(lm, t.animal, t.category, readouts=t.readout, hooks=hooks)[t.readout]
        vs.save(work / VECTOR_FILE)
        return {"hooks": list(vs), "norms": vs.norms()}

    dep = {
        "model": model_key(lm),
        "teacher": t.model_dump(
            include={"animal", "category", "hook", "readout", "vectors", "ablate_from_hook", "kind"}
        ),
    }
    prov = provenance(lm, t)
    res = run_stage(state.run_dir, "teacher-vector", dep, fn, prov, tag=tag, has_progress=never)
    return state.add(res)


def make_teacher(
    t: TeacherConfig, lm: LoadedModel, vectors: VectorSet | None, vectors_file: Path | None
) -> Teacher:
    """The teacher that writes the data. A steered teacher is built from the extracted vector
    in memory; its file path goes into the spec so a fit can rebuild the teacher from the
    dataset's manifest."""
    if t.kind == "steered" and vectors_file is not None:
        t = t.model_copy(update={"vectors": str(vectors_file)})
    from .whitened_teacher import teacher_whiten_texts

    return build_teacher(t, lm, vectors, whiten_texts=teacher_whiten_texts(t))


def stage_data(
    state: RunState, lm: LoadedModel, t: TeacherConfig, vec_stage: StageResult | None, tag: str
) -> StageResult:
    """The teacher writes the numbers dataset (resumable inside the partial folder)."""
    from ..tasks.numbers import make_dataset

    task = state.cfg.task
    vectors = teacher_vector(vec_stage)
    vectors_file = vec_stage.path / VECTOR_FILE if vec_stage else None

    def fn(work: Path) -> dict:
        out = work / DATA_FILE
        steering = vectors if t.kind == "steered" else None
        teacher = make_teacher(t, lm, steering, vectors_file)
        kw = dict(
            n_prompts=task.n_prompts,
            constrained=task.constrained,
            topk=task.topk_logprobs,
            batch_size=task.batch_size,
            max_new_tokens=task.max_new_tokens,
            seed=task.seed,
            temperature=task.temperature,
            backend=task.backend,
        )
        if t.kind == "prompt" and t.ablate_from_hook and vectors is not None:
            # necessity check: the prompted teacher with the trait direction projected out
            with steer(lm.model, vectors, op="ablate"):
                manifest = make_dataset(teacher, str(out), **kw)
        else:
            manifest = make_dataset(teacher, str(out), **kw)
        keep = (
            "n_prompts",
            "n_valid",
            "rejects",
            "tokens_per_second",
            "unconstrained_valid_rate",
            "teacher",
        )
        return {k: manifest.get(k) for k in keep}

    dep = {
        "teacher_vector": vec_stage.key if vec_stage else None,
        "model": model_key(lm),
        "teacher": t.model_dump(),
        "task": task.model_dump(),
    }
    prov = provenance(lm, task, task.seed)
    rows_written = lambda work: _nonempty(work / DATA_FILE)  # noqa: E731
    return state.add(
        run_stage(state.run_dir, "data", dep, fn, prov, tag=tag, has_progress=rows_written)
    )


def never(work: Path) -> bool:
    """has_progress of a stage that cannot resume: a failed one leaves no folder."""
    return False


def _nonempty(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def has_checkpoint(work: Path) -> bool:
    """has_progress of a fit: the loop's checkpoint is what `resume=True` continues from."""
    return (work / CHECKPOINT_FILE).exists()


def same_model(a: LoadedModel, b: LoadedModel) -> bool:
    """Whether two loaded models are the same weights (the student is the teacher's model)."""
    return a is b or (a.weights_hash == b.weights_hash and a.model.dtype == b.model.dtype)


# What a fit of a student of another model is scored against: no teacher (the teacher's
# vector or prompt acts on the teacher's model; on the student's model it has no loss).
NO_TEACHER = {"kind": "plain"}


def fit_teacher(data_stage: StageResult, vec_stage: StageResult | None, cross: bool) -> dict | None:
    """The teacher a fit is scored against: the one that wrote the data (its manifest's
    spec, with the steered teacher's vector file), or NO_TEACHER for a student of another
    model, whose losses are then its own fitted vs base losses."""
    if cross:
        return NO_TEACHER
    if data_stage.info.get("task") in ("facts", "dataset"):
        return None  # documents / a dataset of your own: no teacher, the fit is sft on them
    from ..generate import manifest_path

    teacher = read_json(manifest_path(data_path(data_stage)))["teacher"]
    if teacher.get("kind") == "steered" and vec_stage is not None:
        teacher = {**teacher, "vectors": str(vec_stage.path / VECTOR_FILE)}
    return teacher


def cross_note(teacher_lm: LoadedModel | None, cross: bool) -> dict:
    """What a cross-model fit records instead of teacher losses (nothing for the others)."""
    if not cross or teacher_lm is None:
        return {}
    return {
        "teacher_reference": f"none: the data's teacher runs on {teacher_lm.spec!r}, another "
        "model; the losses compare the fitted student with its own base model"
    }


def stage_fit(
    state: RunState,
    lm: LoadedModel,
    spec: FitSpec,
    seed: int,
    data_stage: StageResult,
    vec_stage: StageResult | None,
    teacher_lm: LoadedModel | None = None,
) -> StageResult:
    """Fit vectors on a teacher's dataset (scored under that teacher for distillation).

    teacher_lm: the model that wrote the data, when it is not `lm` (a student of another
    model: its fit is scored against its own base, never the other model's teacher)."""
    from ..fit import fit

    cfg = spec.fit_config(seed)
    cross = teacher_lm is not None and not same_model(teacher_lm, lm)

    def fn(work: Path) -> dict:
        teacher = fit_teacher(data_stage, vec_stage, cross)
        resume = (work / CHECKPOINT_FILE).exists()
        data = data_source(data_stage)
        res = fit(lm, data, cfg, teacher=teacher, out_dir=work, resume=resume)
        # fit wrote vectors.safetensors (and metrics) into work
        return {**res.summary(), **cross_note(teacher_lm, cross)}

    dep = {
        "data": data_stage.key,
        "model": model_key(lm),
        "fit": cfg.model_dump(exclude={"progress", "cache_budget"}),
    }
    prov = provenance(lm, cfg, seed)
    tag = f"{spec.name}-s{seed}"
    res = run_stage(state.run_dir, "fit", dep, fn, prov, tag=tag, has_progress=has_checkpoint)
    return state.add(res)


def stage_baseline(
    state: RunState,
    lm: LoadedModel,
    b: BaselineSpec,
    data_stage: StageResult,
    teacher_lm: LoadedModel | None = None,
) -> StageResult:
    """A LoRA or full finetune on the main teacher's dataset, to compare the vectors with
    (teacher_lm: as in stage_fit)."""
    from ..fit import fit_full, fit_lora

    cfg = b.fit_config()
    cross = teacher_lm is not None and not same_model(teacher_lm, lm)

    def fn(work: Path) -> dict:
        teacher = fit_teacher(data_stage, None, cross)
        data = data_source(data_stage)
        resume = (work / CHECKPOINT_FILE).exists()
        if b.kind == "lora":
            res = fit_lora(lm, data, cfg, b.lora, teacher=teacher, out_dir=work, resume=resume)
        else:
            res = fit_full(lm, data, cfg, teacher=teacher, out_dir=work, resume=resume)
        # work is a folder teachers.load_adapted reads (see fit_lora)
        return {**res.summary(), **cross_note(teacher_lm, cross)}

    dep = {
        "data": data_stage.key,
        "model": model_key(lm),
        "baseline": b.model_dump(exclude={"progress", "cache_budget"}),
    }
    prov = provenance(lm, b)
    res = run_stage(
        state.run_dir, "baseline", dep, fn, prov, tag=b.kind, has_progress=has_checkpoint
    )
    return state.add(res)
