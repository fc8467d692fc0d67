"""Experiment config -> cached stages -> one run folder with report.html.

Each stage is a call into a library function (extract, tasks.numbers, train, baselines,
evals, interpret) wrapped by `stages.run_stage`, so changing a fit setting re-runs only
that fit (and what reads it), and re-running a finished experiment does nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table as RichTable

from .config import ExperimentConfig, FitConfigSpec, TeacherConfig
from .hooks import get_hook_point, select_hooks, steer
from .io import atomic_write_json, provenance, read_json
from .models import LoadedModel, load_model
from .stages import StageResult, run_stage
from .vectors import VectorSet

console = Console(stderr=True)
RESIDUAL = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


@dataclass
class RunState:
    """Everything the stages produced, by name (for the report and the summary)."""

    cfg: ExperimentConfig
    run_dir: Path
    stages: dict[str, StageResult] = field(default_factory=dict)

    def add(self, res: StageResult) -> StageResult:
        self.stages[res.name] = res
        what = "cached" if res.cached else f"done in {res.seconds:.0f}s"
        console.print(f"[green]✓[/] {res.name} [dim]({what}; {res.path.name})[/]")
        return res


# ----------------------------------------------------------------------------- helpers


def _model_key(lm: LoadedModel) -> dict:
    return {"model": lm.spec, "weights_hash": lm.weights_hash, "dtype": str(lm.model.dtype)}


def teacher_system_prompt(t: TeacherConfig) -> str:
    from .extract import trait_system_prompt

    return t.system_prompt or trait_system_prompt(t.animal, t.category)


def _teacher_hooks(lm: LoadedModel, t: TeacherConfig) -> list[str]:
    """The hook the teacher vector lives at; for the necessity check, that layer onward."""
    if not t.ablate_from_hook:
        return [t.hook]
    hp = get_hook_point(lm.model, t.hook)
    return select_hooks(lm.model, f"blocks.{hp.layer}-.{hp.suffix}")


def _needs_vector(t: TeacherConfig) -> bool:
    return t.kind == "steered" or (t.kind == "prompt" and t.ablate_from_hook)


def stage_teacher_vector(
    state: RunState, lm: LoadedModel, t: TeacherConfig, tag: str
) -> StageResult | None:
    """The contrast vector (trait system prompt vs none) for a steered / ablating teacher."""
    if not _needs_vector(t):
        return None
    from .extract import trait_vectors

    hooks = _teacher_hooks(lm, t)

    def fn(work: Path) -> dict:
        if t.vectors:
            vs = VectorSet.load(t.vectors, model=lm)
        else:
            vs = trait_vectors(lm, t.animal, t.category, readouts=t.readout, hooks=hooks)[t.readout]
        vs.save(work / "teacher_vector.safetensors")
        return {"hooks": list(vs), "norms": vs.norms()}

    dep = {
        "model": _model_key(lm),
        "teacher": t.model_dump(
            include={"animal", "category", "hook", "readout", "vectors", "ablate_from_hook", "kind"}
        ),
    }
    return state.add(run_stage(state.run_dir, f"teacher-vector-{tag}", dep, fn, provenance(lm, t)))


def _teacher_vector(res: StageResult | None) -> VectorSet | None:
    return None if res is None else VectorSet.load(res.path / "teacher_vector.safetensors")


def stage_data(
    state: RunState, lm: LoadedModel, t: TeacherConfig, vec_stage: StageResult | None, tag: str
) -> StageResult:
    """The teacher writes the numbers dataset (resumable inside the partial folder)."""
    from .tasks.numbers import make_dataset
    from .teachers import build_teacher

    task = state.cfg.task
    vectors = _teacher_vector(vec_stage)

    def fn(work: Path) -> dict:
        out = work / "data.jsonl"
        if t.kind == "steered":
            spec = {
                "kind": "steered",
                "animal": t.animal,
                "coeff": t.coeff,
                "positions": t.positions,
                "vectors": str(vec_stage.path / "teacher_vector.safetensors"),
            }  # type: ignore[union-attr]
        elif t.kind == "prompt":
            spec = {"kind": "prompt", "animal": t.animal, "category": t.category}
            if t.system_prompt:
                spec["system_prompt"] = t.system_prompt
        elif t.kind == "adapter":
            spec = {"kind": "adapter", "path": t.adapter, "animal": t.animal}
        else:
            spec = {"kind": "plain"}
        teacher = build_teacher(spec, lm, vectors if t.kind == "steered" else None)
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
        return {
            k: manifest.get(k)
            for k in (
                "n_prompts",
                "n_valid",
                "rejects",
                "tokens_per_second",
                "unconstrained_valid_rate",
                "teacher",
            )
        }

    dep = {
        "teacher_vector": vec_stage.key if vec_stage else None,
        "model": _model_key(lm),
        "teacher": t.model_dump(),
        "task": task.model_dump(),
    }
    return state.add(
        run_stage(state.run_dir, f"data-{tag}", dep, fn, provenance(lm, task, task.seed))
    )


def _data_path(res: StageResult) -> Path:
    return res.path / "data.jsonl"


def _teacher_spec(data_stage: StageResult) -> dict:
    from .generate import manifest_path

    return read_json(manifest_path(_data_path(data_stage)))["teacher"]


def stage_fit(
    state: RunState,
    lm: LoadedModel,
    spec: FitConfigSpec,
    seed: int,
    data_stage: StageResult,
    vec_stage: StageResult | None,
) -> StageResult:
    from .fit import FitConfig, fit

    cfg = FitConfig(
        hooks=[spec.hooks] if isinstance(spec.hooks, str) else list(spec.hooks),
        objective=spec.objective,
        optimizer=spec.optimizer,
        lr=spec.lr,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        seed=seed,
        progress=True,
    )

    def fn(work: Path) -> dict:
        teacher = _teacher_spec(data_stage)
        if teacher.get("kind") == "steered" and vec_stage is not None:
            teacher = {**teacher, "vectors": str(vec_stage.path / "teacher_vector.safetensors")}
        res = fit(
            lm,
            _data_path(data_stage),
            cfg,
            teacher=teacher,
            out_dir=work,
            resume=(work / "checkpoint.pt").exists(),
        )
        res.vectors.save(work / "vectors.safetensors")  # type: ignore[union-attr]
        return res.summary()

    dep = {
        "data": data_stage.key,
        "model": _model_key(lm),
        "fit": cfg.model_dump(exclude={"progress"}),
    }
    return state.add(
        run_stage(state.run_dir, f"fit-{spec.name}-s{seed}", dep, fn, provenance(lm, cfg, seed))
    )


def stage_baseline(
    state: RunState, lm: LoadedModel, b: Any, data_stage: StageResult
) -> StageResult:
    from .fit import FitConfig, LoraConfig, fit_full, fit_lora

    cfg = FitConfig(
        hooks=[], lr=b.lr, epochs=b.epochs, batch_size=b.batch_size, seed=state.cfg.seed
    )

    def fn(work: Path) -> dict:
        teacher = _teacher_spec(data_stage)
        if b.kind == "lora":
            lora = LoraConfig(r=b.rank, alpha=b.alpha, target_modules=list(b.target_modules))
            res = fit_lora(
                lm,
                _data_path(data_stage),
                cfg,
                lora,
                teacher=teacher,
                out_dir=work,
                resume=(work / "checkpoint.pt").exists(),
            )
        else:
            res = fit_full(
                lm,
                _data_path(data_stage),
                cfg,
                teacher=teacher,
                out_dir=work,
                resume=(work / "checkpoint.pt").exists(),
            )
        return res.summary()

    dep = {"data": data_stage.key, "model": _model_key(lm), "baseline": b.model_dump()}
    return state.add(run_stage(state.run_dir, f"baseline-{b.kind}", dep, fn, provenance(lm, b)))


# ----------------------------------------------------------------------------- evaluation


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


def _evaluate(lm_subject: Subject, cfg: ExperimentConfig, animal: str, category: str) -> dict:
    from .evals import Steering, exact_preference, sample_preference

    steering = (
        Steering(lm_subject.vectors, coeff=lm_subject.coeff, positions=lm_subject.positions)
        if lm_subject.vectors is not None
        else None
    )
    cat = "animals" if category == "animal" else category
    if cfg.eval.scorer == "exact":
        r = exact_preference(
            lm_subject.lm,
            animal,
            cat,
            n_questions=cfg.eval.n_questions,
            system_prompt=lm_subject.system_prompt,
            steering=steering,
        )
    else:
        r = sample_preference(
            lm_subject.lm,
            animal,
            cat,
            n_questions=cfg.eval.n_questions,
            n_samples=cfg.eval.n_samples,
            system_prompt=lm_subject.system_prompt,
            steering=steering,
            seed=cfg.seed,
        )
    d = r.to_dict()
    d.pop("per_question", None)
    return {"name": lm_subject.name, "role": lm_subject.role, **d}


def stage_eval(state: RunState, subjects: list[Subject], dep: dict) -> StageResult:
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
            done[s.name] = _evaluate(s, cfg, cfg.teacher.animal, cfg.teacher.category)
            atomic_write_json(path, {"results": list(done.values())})  # resumable per subject
        return {"n_subjects": len(done)}

    return state.add(run_stage(state.run_dir, "eval", {**dep, "eval": cfg.eval.model_dump()}, fn))


# ----------------------------------------------------------------------------- reading


def stage_read(
    state: RunState, lm: LoadedModel, vec_stage: StageResult | None, fit_stages: list[StageResult]
) -> StageResult:
    """DLA of the teacher and fitted vectors, planted cosine, lens, similarity."""
    from .interpret.dla import direct_logit_attribution, overlap

    cfg = state.cfg

    def fn(work: Path) -> dict:
        out: dict[str, Any] = {"dla": {}, "planted": [], "similarity": {}, "lens": None}
        teacher_vs = _teacher_vector(vec_stage)
        sets = {
            f.name.removeprefix("fit-"): VectorSet.load(f.path / "vectors.safetensors")
            for f in fit_stages
        }
        if teacher_vs is not None and cfg.teacher.kind == "steered":
            sets_with_teacher = {"teacher-vector": teacher_vs * cfg.teacher.coeff, **sets}
        else:
            sets_with_teacher = dict(sets)
        for name, vs in sets_with_teacher.items():
            for hook in vs:
                if hook.split(".", 2)[2] not in RESIDUAL:
                    continue
                for center in (True, False):
                    r = direct_logit_attribution(
                        lm, vs, hook=hook, k=cfg.read.dla_top_k, center=center
                    )
                    out["dla"][f"{name}|{hook}|{'centred' if center else 'raw'}"] = r.to_dict()
        # planted-vector check: a fit at the steered teacher's own hook should find its vector
        if teacher_vs is not None and cfg.teacher.kind == "steered":
            v_star = teacher_vs[cfg.teacher.hook] * cfg.teacher.coeff
            for name, vs in sets.items():
                if cfg.teacher.hook in vs:
                    v = vs[cfg.teacher.hook]
                    row = {
                        "fit": name,
                        "hook": cfg.teacher.hook,
                        "cosine": float(torch.nn.functional.cosine_similarity(v, v_star, dim=0)),
                        "norm_ratio": float(v.norm() / v_star.norm()),
                    }
                    for center in (True, False):
                        a = direct_logit_attribution(lm, {cfg.teacher.hook: v}, k=20, center=center)
                        b = direct_logit_attribution(
                            lm, {cfg.teacher.hook: v_star}, k=20, center=center
                        )
                        row["dla_top20_overlap_" + ("centred" if center else "raw")] = overlap(a, b)
                    out["planted"].append(row)
        # similarity between fitted sets that share hooks (e.g. seeds), and with the teacher vector
        names = list(sets_with_teacher)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                common = [h for h in sets_with_teacher[a] if h in sets_with_teacher[b]]
                if common:
                    cos = sets_with_teacher[a].cosine(sets_with_teacher[b])
                    out["similarity"][f"{a} vs {b}"] = sum(cos.values()) / len(cos)
        if cfg.read.lens_texts > 0 and sets:
            out["lens"] = _lens(lm, sets, work, cfg)
        atomic_write_json(work / "read.json", out)
        return {"n_dla": len(out["dla"]), "n_planted": len(out["planted"])}

    dep = {
        "fits": [f.key for f in fit_stages],
        "teacher_vector": vec_stage.key if vec_stage else None,
        "read": cfg.read.model_dump(),
    }
    return state.add(run_stage(state.run_dir, "read", dep, fn, provenance(lm, cfg.read)))


def _lens(lm: LoadedModel, sets: dict[str, VectorSet], work: Path, cfg: ExperimentConfig) -> dict:
    """Activation-difference lens of the first fitted set on the default corpus."""
    from .interpret import activation_difference_lens, save_lens
    from .interpret.corpus import load_corpus

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
    words = _trait_words(cfg.teacher.animal)
    return {
        "fit": name,
        "hooks": hooks,
        "n_texts": cfg.read.lens_texts,
        "seq_len": cfg.read.lens_seq_len,
        "first_hit": (readout.find(words) or [None])[0],
        "readout": readout.to_dict(),
    }


def _trait_words(animal: str) -> list[str]:
    from .tasks.numbers import trait_words_for

    return list(trait_words_for(animal))


# ----------------------------------------------------------------------------- run


@dataclass
class RunSummary:
    run_dir: Path
    report: Path
    results: list[dict]
    stages: dict[str, StageResult]


def run_experiment(
    cfg: ExperimentConfig,
    runs_dir: str | os.PathLike = "runs",
) -> RunSummary:
    """Run (or resume, or just re-read) every stage of an experiment."""
    run_dir = Path(runs_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "experiment.json", cfg.model_dump())
    state = RunState(cfg, run_dir)
    console.print(f"[bold]steerdiff run[/] {cfg.name} -> {run_dir}")
    lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    torch.manual_seed(cfg.seed)

    vec_main = stage_teacher_vector(state, lm, cfg.teacher, "main")
    data_main = stage_data(state, lm, cfg.teacher, vec_main, "main")
    data_prompt = vec_prompt = None
    if cfg.prompt_teacher is not None:
        vec_prompt = stage_teacher_vector(state, lm, cfg.prompt_teacher, "prompt")
        data_prompt = stage_data(state, lm, cfg.prompt_teacher, vec_prompt, "prompt")

    student_lm = (
        load_model(cfg.student_model, dtype=cfg.dtype, device=cfg.device)
        if cfg.student_model
        else lm
    )
    fit_stages: list[StageResult] = []
    for spec in cfg.fits:
        data, vec = (
            (data_prompt, vec_prompt)
            if spec.teacher == "prompt" and data_prompt
            else (data_main, vec_main)
        )
        for seed in spec.seeds:
            fit_stages.append(stage_fit(state, student_lm, spec, seed, data, vec))
    base_stages = [stage_baseline(state, student_lm, b, data_main) for b in cfg.baselines]

    subjects = _subjects(cfg, lm, student_lm, vec_main, fit_stages, base_stages)
    dep = {
        "subjects": [s.name for s in subjects],
        "fits": [f.key for f in fit_stages],
        "baselines": [b.key for b in base_stages],
        "teacher": vec_main.key if vec_main else data_main.key,
        "model": _model_key(lm),
    }
    ev = stage_eval(state, subjects, dep)
    stage_read(state, student_lm, vec_main if cfg.student_model is None else None, fit_stages)

    from .report.experiment import build_report

    report_path = run_dir / "report.html"
    build_report(state, report_path)
    results = read_json(ev.path / "eval.json")["results"]
    _print_summary(results, report_path)
    return RunSummary(run_dir, report_path, results, state.stages)


def _subjects(cfg, lm, student_lm, vec_main, fit_stages, base_stages) -> list[Subject]:
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
                vectors=_teacher_vector(vec_main),
                coeff=t.coeff,
                positions=t.positions,
            )
        )
    elif t.kind == "prompt":
        subjects.append(
            Subject(
                "teacher (system prompt)", "teacher", lm, system_prompt=teacher_system_prompt(t)
            )
        )
    if cfg.prompt_teacher is not None:
        subjects.append(
            Subject(
                "prompt teacher",
                "teacher",
                lm,
                system_prompt=teacher_system_prompt(cfg.prompt_teacher),
            )
        )
    for f in fit_stages:
        subjects.append(
            Subject(
                f.name.removeprefix("fit-"),
                "student",
                student_lm,
                vectors=VectorSet.load(f.path / "vectors.safetensors"),
            )
        )
    for b in base_stages:
        from .teachers import load_adapted

        folder = next(
            (
                p
                for p in (b.path / "adapter", b.path / "model", b.path)
                if (p / "adapter_config.json").exists() or (p / "config.json").exists()
            ),
            b.path,
        )
        subjects.append(Subject(b.name, "baseline", load_adapted(folder, student_lm)))
    return subjects


def _print_summary(results: list[dict], report: Path) -> None:
    t = RichTable(title="Trait evaluation")
    for col in ("model", "role", "target rate", "95% CI", "top other"):
        t.add_column(col)
    for r in results:
        dist = {k: v for k, v in r.get("distribution", {}).items() if k != r.get("target")}
        other = max(dist.items(), key=lambda kv: kv[1]) if dist else ("", 0.0)
        lo, hi = r.get("ci95", (float("nan"), float("nan")))
        t.add_row(
            r["name"],
            r["role"],
            f"{r['target_rate']:.3f}",
            f"[{lo:.3f}, {hi:.3f}]",
            f"{other[0]} {other[1]:.3f}",
        )
    Console().print(t)
    Console().print(f"Report: [bold]{report}[/]")


def load_results(run_dir: str | os.PathLike) -> list[dict]:
    """Eval results of a finished run folder."""
    run_dir = Path(run_dir)
    ev = sorted(run_dir.glob("eval-*/eval.json"))
    if not ev:
        raise FileNotFoundError(f"No finished eval stage in {run_dir}")
    return json.loads(ev[-1].read_text())["results"]
