"""The report's MELBO section (pipeline.melbo_stage: melbo.json, melbo.png): the objective
curves and the plateau plot, a table of the vectors (objective, eval shifts with 95% CIs,
|cos| with the teacher vector when the run has one at the source hook), and a few samples."""

from __future__ import annotations

from typing import Any

from ..io import read_json
from .html import Code, Figure, Report, Table, Text
from .run_folder import RunFolder


def _ci(d: dict[str, Any], key: str = "shift") -> str:
    lo, hi = d[f"{key}_ci95"]
    return f"{d[key]:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def vector_rows(doc: dict) -> list[dict]:
    """One table row per vector, in the ranking's order (most shifted first)."""
    ev = doc.get("evals", {})
    by_index = {v["vector"]: v for v in ev.get("vectors", [])}
    cos = doc.get("planted", {}).get("cos")
    rows = []
    for o in doc["training"]["objective"]:
        i = o["vector"]
        row: dict[str, Any] = {
            "vector": i,
            "objective start": o["first"],
            "objective end": o["last"],
        }
        v = by_index.get(i, {})
        if "preference" in v:
            row["trait share"] = v["preference"]["target_rate"]
            row["trait shift (95% CI)"] = _ci(v["preference"])
        if "misalignment" in v:
            row["p_misaligned shift (95% CI)"] = _ci(v["misalignment"])
        if "coherence_kl" in v:
            lo, hi = v.get("coherence_kl_ci95", (float("nan"), float("nan")))
            row["coherence KL (95% CI)"] = f"{v['coherence_kl']:.3f} [{lo:.3f}, {hi:.3f}]"
        if cos is not None:
            row["|cos| with teacher"] = cos[i]
        rows.append(row)
    order = ev.get("ranking") or [r["vector"] for r in rows]
    return sorted(rows, key=lambda r: order.index(r["vector"]))


def melbo_sections(r: Report, run: RunFolder) -> None:
    """The run's melbo stage, if it has one."""
    st = run.first("melbo")
    if st is None or not (st.path / "melbo.json").exists():
        return
    doc = read_json(st.path / "melbo.json")
    c, t = doc["config"], doc["training"]
    sec = r.section("MELBO: unsupervised steering vectors", anchor="melbo")
    sec.add(
        Text(
            f"{t['n_vectors']} orthogonal vectors of {c['norm']} norm R = {c['radius']:g} added "
            f"at {c['source_hook']} (every position), each maximising the change of "
            f"{c['target_hook']}'s activations on {t['n_prompts']} prompts (Mack & Turner 2024; "
            f"p = {c['p']:g}, q = {c['q'] or c['p']:g}, {c['steps']} steps; the first "
            f"{c['skip_first']} position(s) of each prompt left out of the objective). Each "
            "vector steers with coefficient 1; shifts are paired with the unsteered model over "
            "questions."
        )
    )
    if (st.path / "melbo.png").exists():
        sec.add(
            Figure.from_file(
                st.path / "melbo.png",
                "Left: objective over training per vector. Right (with a radius sweep): mean "
                "||dZ|| at the target hook vs R, trained vs random vectors of the same norm.",
            )
        )
    ev = doc.get("evals")
    caption = "Vectors" + (f", ranked by the {ev['rank_by']} shift" if ev else "")
    sec.add(Table(vector_rows(doc), caption))
    if ev and "preference" in ev.get("base", {}):
        b = ev["base"]["preference"]
        sec.add(
            Text(
                f"Unsteered trait share {b['target_rate']:.4f} (95% CI {b['ci95'][0]:.4f} to {b['ci95'][1]:.4f})."
            )
        )
    pl = doc.get("planted")
    if pl:
        sec.add(
            Text(
                f"Teacher vector at the source hook: best |cos| {pl['best_cos']:.3f} (vector "
                f"{pl['best_vector']}) vs {pl['chance_best_cos_p95']:.3f}, the 95th percentile "
                f"of the best of {t['n_vectors']} random directions (above chance: "
                f"{'yes' if pl['above_chance'] else 'no'}); the teacher vector's fraction "
                f"inside the vectors' span {pl['span_fraction']:.3f}.",
                kind="note",
            )
        )
    if doc.get("sweep"):
        keep = ("radius", "trained_change", "random_change", "change_ratio", "relative_change")
        sec.add(Table([{k: row[k] for k in keep} for row in doc["sweep"]], "Radius sweep"))
    if ev:
        samples = [
            {"vector": v["vector"], **s} for v in ev["vectors"][:4] for s in v["samples"][:1]
        ]
        if samples:
            sec.add(Code(samples, caption="Sampled completions (first prompt, first 4 vectors)"))
