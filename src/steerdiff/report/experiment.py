"""Build the report page of one experiment run from its run folder (never the pipeline):
evaluation, teacher data (or a facts / dataset task's data, beliefs and faithfulness:
narrow.py), misalignment (misalignment.py), fits, planted-vector check, DLA, lens,
similarity, provenance."""

from __future__ import annotations

import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..evals.preference import CategoryError, PreferenceResult, paired_difference
from ..fit.losses import NOISE_GAP_NATS, gap_within_noise
from ..io import read_json, read_jsonl
from .figures import eval_figure, loss_figure
from .fuzz import fuzz_sections
from .html import Code, Figure, Report, Table, Text, write
from .melbo import melbo_sections
from .misalignment import misalignment_sections
from .narrow import narrow_sections
from .profile import profile_sections
from .run_folder import RunFolder, read_run
from .sae import sae_sections
from .whiten import whiten_sections


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _eval_rows(results: list[dict], experiment: dict) -> list[dict]:
    """The evaluation table; with a student of another model, a column names each row's."""
    rows = []
    two_models = bool(experiment.get("student_model"))
    for r in results:
        lo, hi = r["ci95"]
        dist = {k: v for k, v in r.get("distribution", {}).items() if k != r["target"]}
        top_other = max(dist.items(), key=lambda kv: kv[1]) if dist else ("", 0.0)
        rows.append(
            {
                "model": r["name"],
                "role": r["role"],
                f"{r['target']} rate": r["target_rate"],
                "95% CI low": lo,
                "95% CI high": hi,
                "top other": f"{top_other[0]} ({_pct(top_other[1])})",
                "questions": r.get("n_questions"),
            }
        )
        if two_models:
            rows[-1] = {"model": r["name"], "of": row_model(r, experiment), **rows[-1]}
    return rows


def row_model(row: dict, experiment: dict) -> str:
    """The model a result row was evaluated on (for run folders from before eval rows named
    it: students, baselines and `student-base` are of the student model, the rest of the
    teacher's)."""
    if row.get("model"):
        return row["model"]
    student = experiment.get("student_model") or experiment["model"]
    if row["role"] in ("student", "baseline") or row["name"] == "student-base":
        return student
    return experiment["model"]


def as_preference(row: dict) -> PreferenceResult:
    """An eval.json row back as the PreferenceResult it was saved from."""
    return PreferenceResult(
        **{f.name: row[f.name] for f in fields(PreferenceResult) if f.name in row}
    )


def compare_with_base(row: dict, base: dict) -> str:
    """`row` vs the base model it was made from: the paired per-question difference of the
    target rate with its 95% interval, or (for rows saved without per-question rates) the
    overlap of the two intervals."""
    ratio = row["target_rate"] / base["target_rate"] if base["target_rate"] > 0 else float("inf")
    head = (
        f"{row['name']} ({row['role']}, model {row.get('model', '?')}): "
        f"{_pct(row['target_rate'])} vs its base model ({base['name']}) "
        f"{_pct(base['target_rate'])}, x{ratio:.2f}"
    )
    try:
        diff, (lo, hi) = paired_difference(as_preference(row), as_preference(base))
    except (CategoryError, KeyError, TypeError):  # no per-question rates on the same questions
        (lo_r, hi_r), (lo_b, hi_b) = row["ci95"], base["ci95"]
        if lo_r > hi_b:
            what = "higher than its base model (intervals do not overlap; not paired)"
        elif hi_r < lo_b:
            what = "lower than its base model (intervals do not overlap; not paired)"
        else:
            what = "not distinguishable from its base model (intervals overlap; not paired)"
        return f"{head}: {what}."
    n = len(row["per_question"])
    paired = (
        f"paired difference {100 * diff:+.1f} pp "
        f"[95% CI {100 * lo:+.1f}, {100 * hi:+.1f}] over {n} questions"
    )
    if n < 2:
        what = "one question: no interval"
    elif lo > 0:
        what = "higher than its base model"
    elif hi < 0:
        what = "lower than its base model"
    else:
        what = "not distinguishable from its base model (the interval includes 0)"
    return f"{head}; {paired}: {what}."


def verdict_lines(results: list[dict], experiment: dict) -> list[str]:
    """One line per non-base row: compared with the base row of ITS OWN model (a student of
    another model is never compared with the teacher's base), paired per question."""
    bases = {row_model(r, experiment): r for r in results if r["role"] == "base"}
    lines = []
    for r in results:
        if r["role"] == "base":
            continue
        model = row_model(r, experiment)
        base = bases.get(model)
        if base is None:
            lines.append(
                f"{r['name']} ({r['role']}): no base-model result of {model!r} to compare with."
            )
        else:
            lines.append(compare_with_base({**r, "model": model}, base))
    return lines


def _verdict(results: list[dict], experiment: dict) -> Text:
    """Say plainly whether each model moved toward the trait relative to its own base."""
    if not any(r["role"] == "base" for r in results):
        return Text("No base model result.")
    return Text("\n\n".join(verdict_lines(results, experiment)), kind="note")


def _dla_table(d: dict, n: int = 12) -> list[dict]:
    top = d.get("top", [])[:n]
    bottom = d.get("bottom", [])[:n]
    rows = []
    for i in range(max(len(top), len(bottom))):
        row: dict[str, Any] = {"rank": i + 1}
        if i < len(top):
            row["promoted"] = repr(top[i]["token"])
            row["score +"] = top[i]["score"]
        if i < len(bottom):
            row["suppressed"] = repr(bottom[i]["token"])
            row["score -"] = bottom[i]["score"]
        rows.append(row)
    return rows


def build_report(run_dir: str | os.PathLike) -> Path:
    """Write run_dir/report.html from the run folder (experiment.json, stages.json and each
    stage's stage.json and files); returns its path."""
    run = read_run(run_dir)
    cfg = run.experiment
    task = cfg.get("task", {}).get("name", "numbers")
    if task == "numbers":
        t = cfg["teacher"]
        subtitle = f"model {cfg['model']}; teacher {t['kind']} ({t['animal']})"
    else:
        subtitle = f"model {cfg['model']}; task {task}"
    r = Report(f"steerdiff: {cfg['name']}", subtitle=subtitle)
    if task == "numbers":
        _evaluation_section(r, run)
        _data_section(r, run)
    narrow_sections(r, run)
    misalignment_sections(r, run)
    _fits_section(r, run)
    rd = run.first("read")
    if rd is not None:
        _read_sections(r, read_json(rd.path / "read.json"), rd.path)
    sae_sections(r, run)
    whiten_sections(r, run)
    melbo_sections(r, run)
    fuzz_sections(r, run)
    profile_sections(r, run)
    sec = r.section("Provenance")
    for s in run.stages:
        sec.add(
            Code(
                {
                    "stage": s.name,
                    "folder": s.path.name,
                    "seconds": s.meta.get("seconds"),
                    "provenance": s.meta.get("provenance"),
                    "depends_on": s.meta.get("depends_on"),
                },
                caption=s.name,
            )
        )
    sec.add(Code(cfg, caption="experiment config"))
    return write(r, run.path / "report.html")


def _evaluation_section(r: Report, run: RunFolder) -> None:
    ev = run.first("eval")
    results = read_json(ev.path / "eval.json")["results"] if ev else []
    sec = r.section("Trait evaluation")
    if not results:
        return
    scorer, n_questions = run.experiment["eval"]["scorer"], run.experiment["eval"]["n_questions"]
    sec.add(
        Text(
            f"Scorer: {scorer} ({'probability of each candidate answer, normalised over the candidate list' if scorer == 'exact' else 'sampled one-word answers at temperature 1'}), "
            f"{n_questions} questions, no system prompt except for prompted teachers. "
            "The interval is a 95% confidence interval across questions."
        )
    )
    sec.add(_verdict(results, run.experiment))
    sec.add(Table(_eval_rows(results, run.experiment), caption="Target share per model"))
    sec.add(eval_figure(results))


def _data_section(r: Report, run: RunFolder) -> None:
    sec = r.section("Teacher data")
    for s in run.of_kind("data"):
        info = s.info
        rows = [
            {
                "dataset": s.name,
                "prompts": info.get("n_prompts"),
                "valid rows": info.get("n_valid"),
                "tokens/s": info.get("tokens_per_second"),
                "unconstrained valid rate": info.get("unconstrained_valid_rate"),
            }
        ]
        sec.add(Table(rows))
        if info.get("rejects"):
            sec.add(
                Table(
                    [{"reason": k, "count": v} for k, v in info["rejects"].items()],
                    caption=f"{s.name}: rejected rows by reason",
                )
            )
        examples = [
            row for _, row in zip(range(3), read_jsonl(s.path / "data.jsonl"), strict=False)
        ]
        sec.add(
            Table(
                [
                    {
                        "user": e["messages"][0]["content"][:120],
                        "assistant": e["messages"][-1]["content"][:80],
                    }
                    for e in examples
                ],
                caption="First rows (what the student sees)",
            )
        )


def _fits_section(r: Report, run: RunFolder) -> None:
    stages = run.of_kind("fit", "baseline")
    sec = r.section("Fits")
    if not stages:
        sec.add(Text("No fits in this experiment."))
        return
    rows = []
    for s in stages:
        i = s.info
        rows.append(
            {
                "fit": s.name,
                "base val loss": i.get("base_val_loss"),
                "teacher val loss": i.get("teacher_val_loss"),
                "fitted val loss": i.get("fitted_val_loss"),
                "loss gap closed": _with_ci(i.get("gap_closed"), i.get("gap_closed_ci")),
                "KL gap closed": _with_ci(i.get("kl_gap_closed"), i.get("kl_gap_closed_ci")),
                "steps": i.get("steps"),
            }
        )
    sec.add(
        Text(
            "Loss gap closed = (base - fitted) / (base - teacher) in cross-entropy on the "
            "validation completions; KL gap closed = 1 - KL(teacher || fitted) / "
            "KL(teacher || base) over the teacher's stored top-k (distillation fits). "
            "Brackets: 95% bootstrap interval over validation rows."
        )
    )
    small = [x["fit"] for x in rows if gap_within_noise(x["base val loss"], x["teacher val loss"])]
    if small:
        sec.add(
            Text(
                f"For {', '.join(small)} the base and teacher validation losses differ by "
                f"less than {NOISE_GAP_NATS} nats per token, so the cross-entropy gap closed is dominated "
                "by noise (values far outside 0..1 happen); read the KL gap closed instead.",
                kind="warn",
            )
        )
    sec.add(Table(rows))
    # curves are labelled by the fit's tag ("vec-s0") and by the baseline's full name
    fig = loss_figure([(s.tag if s.kind == "fit" and s.tag else s.name, s.path) for s in stages])
    if fig:
        sec.add(fig)


def _read_sections(r: Report, read: dict, folder: Path) -> None:
    """Planted-vector check, DLA, lens and similarity from the read stage's read.json."""
    if read.get("planted"):
        sec = r.section("Planted-vector check")
        sec.add(
            Text(
                "The steered teacher is the model plus a known vector v* at one hook; a vector fitted at that hook on the teacher's data should point the same way (cosine near 1). The DLA overlap counts shared tokens among the top 20 of the fitted vector and of v*."
            )
        )
        sec.add(Table(read["planted"]))
    sec = r.section("Direct logit attribution")
    sec.add(
        Text(
            "Residual-stream vectors pushed through the final norm's scale and the unembedding. 'centred' subtracts the mean over the vocabulary from each unembedding column, removing a shift of every logit that otherwise dominates the top tokens."
        )
    )
    for key, d in read.get("dla", {}).items():
        if key.endswith("|centred"):
            sec.add(Table(_dla_table(d), caption=key.replace("|", "  ·  "), digits=3))
    if not read.get("dla"):
        sec.add(
            Text(
                "No residual-stream vectors to read directly (q/k/v and norm-input biases are read through the lens below)."
            )
        )
    lens = read.get("lens")
    sec = r.section("Activation-difference lens")
    if lens:
        hit = lens.get("first_hit")
        sec.add(
            Text(
                f"Mean activation difference (model with the '{lens['fit']}' vectors minus without) over {lens['n_texts']} corpus texts x {lens['seq_len']} tokens, "
                f"per position for the first positions and over all positions, read through the centred logit lens at {', '.join(lens['hooks'])}. "
                + (
                    f"First trait token in a top-20: {hit['token']!r} at {hit['hook']} position {hit['position']} (rank {hit['rank']})."
                    if hit
                    else "No trait token reached the top 20 at any hook or position."
                ),
                kind="note",
            )
        )
        png = folder / "lens" / "lens_positions.png"
        if png.exists():
            sec.add(
                Figure.from_file(png, "Top tokens of the mean difference per hook and position")
            )
        rows = [
            {
                "hook": x["hook"],
                "position": x["position"],
                "|diff|": x["diff_norm"],
                "top tokens": " ".join(repr(t["token"]) for t in x["top"][:8]),
            }
            for x in lens["readout"]["rows"] + lens["readout"]["logits"]
        ]
        sec.add(Table(rows, caption="Lens readout", digits=3))
    else:
        sec.add(Text("Lens not run (read.lens_texts = 0 or no fitted vectors)."))
    sec = r.section("Similarity")
    if read.get("similarity"):
        sec.add(
            Table(
                [
                    {"pair": k, "mean cosine over shared hooks": v}
                    for k, v in read["similarity"].items()
                ]
            )
        )
    else:
        sec.add(Text("No pairs of vector sets with shared hooks."))


def _with_ci(value: float | None, ci: list[float] | tuple[float, float] | None) -> str | None:
    """0.62 [0.55, 0.70] (a bootstrap interval over validation rows), or the bare value."""
    if value is None:
        return None
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.2f}"
