"""Experiment config -> cached stages -> one run folder with report.html.

Each stage is a call into a library function (extract, tasks.numbers / tasks.facts, fit,
evals, interpret) wrapped by `stages.run_stage`, so changing a fit setting re-runs only that fit
(and what reads it), and re-running a finished experiment does nothing. The report is
built from the run folder alone (`steerdiff.report.build_report`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table as RichTable

from ..io import atomic_write_json, read_json
from ..report import build_report
from ..report.run_folder import EXPERIMENT_FILE, RunFolderError, read_run
from .checks import check_experiment, load_models
from .config import ExperimentConfig
from .eval_stages import make_subjects, stage_eval, stage_read
from .fit_stages import stage_baseline, stage_data, stage_fit, stage_teacher_vector
from .fuzz_stage import stage_fuzz
from .melbo_stage import stage_melbo
from .misalignment_stages import stage_freeform, stage_misalignment
from .narrow_stages import stage_beliefs, stage_dataset, stage_facts_data, stage_faithfulness
from .profile_stage import stage_profile
from .sae_stages import stage_sae_read, stage_sae_train
from .stages import RunState, StageResult, console, model_key
from .whiten_stage import stage_whiten


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
    """Run (or resume, or just re-read) every stage of an experiment.

    The models load and everything that needs them is checked (`checks.check_experiment`)
    before anything is written: a bad hook, model path or fit setting raises ConfigError
    naming the experiment file and key, with no run folder made."""
    console.print(f"[bold]steerdiff run[/] {cfg.name}")
    lm, student_lm = load_models(cfg)
    check_experiment(cfg, lm, student_lm)
    run_dir = Path(runs_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / EXPERIMENT_FILE, cfg.model_dump())
    state = RunState(cfg, run_dir)
    console.print(f"  run folder {run_dir}")
    torch.manual_seed(cfg.seed)

    if cfg.task.name == "numbers":
        vec_main = stage_teacher_vector(state, lm, cfg.teacher, "main")
        data_main = stage_data(state, lm, cfg.teacher, vec_main, "main")
    else:  # documents / your own dataset: no teacher writes the data
        vec_main = None
        data_main = stage_facts_data(state) if cfg.task.name == "facts" else stage_dataset(state)
    data_prompt = vec_prompt = None
    if cfg.prompt_teacher is not None:
        vec_prompt = stage_teacher_vector(state, lm, cfg.prompt_teacher, "prompt")
        data_prompt = stage_data(state, lm, cfg.prompt_teacher, vec_prompt, "prompt")

    fit_stages: list[StageResult] = []
    for spec in cfg.fits:
        data, vec = (data_prompt, vec_prompt) if spec.teacher == "prompt" else (data_main, vec_main)
        assert data is not None  # check_experiment: a "prompt" fit has a prompt teacher
        for seed in spec.seeds or []:
            fit_stages.append(stage_fit(state, student_lm, spec, seed, data, vec, teacher_lm=lm))
    base_stages = [
        stage_baseline(state, student_lm, b, data_main, teacher_lm=lm) for b in cfg.baselines
    ]

    results: list[dict] = []
    if cfg.trait_eval:
        subjects = make_subjects(cfg, lm, student_lm, vec_main, fit_stages, base_stages)
        dep = {
            "subjects": [s.name for s in subjects],
            "fits": [f.key for f in fit_stages],
            "baselines": [b.key for b in base_stages],
            "teacher": vec_main.key if vec_main else data_main.key,
            "model": model_key(lm),
        }
        ev = stage_eval(state, subjects, dep)
        results = read_json(ev.path / "eval.json")["results"]
    if cfg.beliefs is not None:
        stage_beliefs(state, student_lm, fit_stages, base_stages)
    if cfg.misalignment is not None:
        stage_misalignment(state, student_lm, fit_stages, base_stages)
        if cfg.misalignment.free_form:
            stage_freeform(state, student_lm, fit_stages, base_stages)
    if cfg.faithfulness is not None:
        stage_faithfulness(state, student_lm, data_main, fit_stages, base_stages)
    stage_read(state, student_lm, vec_main if cfg.student_model is None else None, fit_stages)
    if cfg.sae is not None:
        trained = stage_sae_train(state, student_lm) if cfg.sae.train is not None else None
        stage_sae_read(state, student_lm, fit_stages, base_stages, trained)
    # the steering toolbox (issue 16)
    if cfg.whiten is not None:
        stage_whiten(state, student_lm, fit_stages, base_stages)
    if cfg.melbo is not None:
        stage_melbo(state, student_lm, fit_stages, base_stages)
    if cfg.fuzz is not None:
        stage_fuzz(state, student_lm, fit_stages, base_stages)
    if cfg.profile is not None:
        stage_profile(state, student_lm, fit_stages, base_stages)

    report_path = build_report(run_dir)
    if results:
        _print_summary(results, report_path)
    else:
        Console().print(f"Report: [bold]{report_path}[/]")
    return RunSummary(run_dir, report_path, results, state.stages)


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
    ev = read_run(run_dir).first("eval")
    if ev is None:
        raise RunFolderError(f"No finished eval stage in {run_dir}")
    return read_json(ev.path / "eval.json")["results"]
