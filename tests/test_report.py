"""The HTML report: self-contained, sections and plots visible in a real browser."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from steerdiff.io import append_jsonl, atomic_write_json
from steerdiff.report import build_report
from steerdiff.report.browser import find_chromium, view_in_chromium
from steerdiff.report.html import Code, Figure, Report, Table, Text, render, write
from steerdiff.report.run_folder import RunFolderError


def small_report() -> Report:
    r = Report("Owl experiment", subtitle="test run")
    s = r.section("Trait evaluation")
    s.add(Text("Owl share rose from 2.7% to 22% <b>not bold</b>."))
    s.add(
        Table([{"model": "base", "owl": 0.027}, {"model": "teacher", "owl": 0.22}], caption="rates")
    )
    fig, ax = plt.subplots()
    ax.bar(["base", "teacher"], [0.027, 0.22])
    s.add(Figure.from_matplotlib(fig, "owl share"))
    r.section("Provenance").add(Code({"model": "default", "seed": 0}))
    return r


def test_render_is_self_contained_and_escaped():
    page = render(small_report())
    assert page.count("data:image/png;base64,") == 1
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page and "<b>not bold" not in page
    assert "0.027" in page and 'src="http' not in page


@pytest.mark.skipif(find_chromium() is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    path = write(small_report(), tmp_path / "report.html")
    view = view_in_chromium(path, screenshot=tmp_path / "shot.png")
    assert view.section_titles == ["Trait evaluation", "Provenance"]
    assert view.n_images == 1 and view.n_images_decoded == 1
    png = (tmp_path / "shot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"  # a PNG of the window size asked for
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1200, 2400)


def fake_run(run_dir: Path) -> Path:
    """A run folder as `steerdiff run` leaves it: experiment.json, stages.json, stage folders."""
    run_dir.mkdir(parents=True)
    experiment = {
        "name": "fake",
        "model": "default",
        "teacher": {"kind": "steered", "animal": "owl"},
        "eval": {"scorer": "exact", "n_questions": 2},
    }
    stages = {
        "data-main-aaa": ("data", "main", {"n_prompts": 2, "n_valid": 2, "rejects": {"len": 1}}),
        "fit-vec-s0-bbb": ("fit", "vec-s0", {"base_val_loss": 1.0, "teacher_val_loss": 0.5}),
        "fit-vec-s0-old": ("fit", "vec-s0", {}),  # a stale cache: not in stages.json
        "eval-ccc": ("eval", None, {"n_subjects": 2}),
        "read-ddd": ("read", None, {}),
    }
    for folder, (kind, tag, info) in stages.items():
        name = f"{kind}-{tag}" if tag else kind
        meta = {"stage": name, "kind": kind, "tag": tag, "info": info, "seconds": 1.0}
        atomic_write_json(run_dir / folder / "stage.json", meta)
    row = {
        "messages": [{"role": "user", "content": "1 2 3"}, {"role": "assistant", "content": "4"}]
    }
    append_jsonl(run_dir / "data-main-aaa" / "data.jsonl", [row, row])
    append_jsonl(
        run_dir / "fit-vec-s0-bbb" / "metrics.jsonl",
        [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": 0.8, "val_loss": 0.9}],
    )
    result = {"target": "owl", "target_rate": 0.1, "ci95": [0.05, 0.15], "distribution": {}}
    results = [
        {"name": "base", "role": "base", **result},
        {"name": "vec-s0", "role": "student", **result},
    ]
    atomic_write_json(run_dir / "eval-ccc" / "eval.json", {"results": results})
    top = [{"token": " owl", "score": 1.0}]
    read = {
        "dla": {"vec-s0|blocks.24.hook_resid_post|centred": {"top": top, "bottom": top}},
        "planted": [{"fit": "vec-s0", "hook": "blocks.24.hook_resid_post", "cosine": 0.9}],
        "similarity": {},
        "lens": None,
    }
    atomic_write_json(run_dir / "read-ddd" / "read.json", read)
    atomic_write_json(run_dir / "experiment.json", experiment)
    index = [f for f in stages if not f.endswith("-old")]
    atomic_write_json(run_dir / "stages.json", {"stages": index})
    return run_dir


def test_experiment_report_reads_only_the_run_folder(tmp_path):
    path = build_report(fake_run(tmp_path / "fake"))
    assert path == tmp_path / "fake" / "report.html"
    page = path.read_text()
    for title in ("Trait evaluation", "Teacher data", "Fits", "Planted-vector check", "Provenance"):
        assert f">{title}<" in page, title
    assert page.count("data:image/png;base64,") == 2  # evaluation bars and loss curves
    assert "fit-vec-s0-bbb" in page and "fit-vec-s0-old" not in page
    with pytest.raises(RunFolderError, match="has no experiment.json"):
        build_report(tmp_path)


def test_report_does_not_import_the_pipeline():
    code = (
        "import sys, steerdiff.report.experiment; "
        "sys.exit(any(m.startswith('steerdiff.pipeline') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


QUESTIONS = [f"q{i}" for i in range(5)]


def _row(name: str, role: str, model: str | None, rates: list[float]) -> dict:
    """An eval.json row as the eval stage writes it (per-question target rates kept)."""
    mean = sum(rates) / len(rates)
    row = {
        "name": name,
        "role": role,
        "scorer": "exact",
        "category": "animals",
        "target": "owl",
        "target_rate": mean,
        "ci95": [mean - 0.01, mean + 0.01],
        "distribution": {"owl": mean},
        "per_question": [
            {"question": q, "target_rate": r} for q, r in zip(QUESTIONS, rates, strict=True)
        ],
        "n_questions": len(rates),
    }
    return row if model is None else {**row, "model": model}


CROSS_EXPERIMENT = {"name": "cross", "model": "default", "student_model": "gemma3-270m"}
SMOL_BASE = [0.005, 0.009, 0.012, 0.008, 0.011]  # mean 0.9%
GEMMA_BASE = [0.060, 0.075, 0.070, 0.065, 0.075]  # mean 6.9%
GEMMA_DIFFS = [-0.020, -0.026, -0.022, -0.024, -0.023]  # mean -2.3 pp, CI [-2.5, -2.1]
GEMMA_STUDENT = [b + d for b, d in zip(GEMMA_BASE, GEMMA_DIFFS, strict=True)]  # mean 4.6%


def test_verdict_compares_each_row_with_its_own_models_base_paired():
    """Bug: `_verdict` compared every row with the FIRST base row, so a Gemma student at 4.6%
    (its own Gemma base: 6.9%) read "x5.02: higher than the base model" against the SmolLM2
    base (0.9%). Each row must be paired per question with the base of its own model."""
    from steerdiff.report.experiment import verdict_lines

    results = [
        _row("base", "base", "default", SMOL_BASE),
        _row("student-base", "base", "gemma3-270m", GEMMA_BASE),
        _row("teacher (steered)", "teacher", "default", [0.2] * 5),
        _row("gemma-s0", "student", "gemma3-270m", GEMMA_STUDENT),
    ]
    teacher, student = verdict_lines(results, CROSS_EXPERIMENT)
    assert student == (
        "gemma-s0 (student, model gemma3-270m): 4.6% vs its base model (student-base) 6.9%, "
        "x0.67; paired difference -2.3 pp [95% CI -2.5, -2.1] over 5 questions: "
        "lower than its base model."
    )
    assert teacher.startswith(
        "teacher (steered) (teacher, model default): 20.0% vs its base "
        "model (base) 0.9%, x22.22; paired difference +19.1 pp"
    )
    assert teacher.endswith(": higher than its base model.")
    # rows of run folders from before eval rows named their model: the experiment says which
    old = [{k: v for k, v in r.items() if k not in ("model", "per_question")} for r in results]
    line = verdict_lines(old, CROSS_EXPERIMENT)[1]
    assert line.startswith(
        "gemma-s0 (student, model gemma3-270m): 4.6% vs its base model (student-base) 6.9%"
    )
    assert line.endswith("lower than its base model (intervals do not overlap; not paired).")
    # a paired difference whose interval includes 0 is not called higher or lower
    noisy = _row(
        "noisy-s0",
        "student",
        "gemma3-270m",
        [b + d for b, d in zip(GEMMA_BASE, [0.01, -0.01, 0.012, -0.011, 0.0], strict=True)],
    )
    (line,) = verdict_lines([results[1], noisy], CROSS_EXPERIMENT)
    assert line.endswith("not distinguishable from its base model (the interval includes 0).")
