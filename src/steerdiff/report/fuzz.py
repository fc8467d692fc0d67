"""Fuzzing curves as a figure and a verdict table: `steerdiff fuzz` writes fuzz.png with
them, and the report's fuzz section (the run's `fuzz` stage: fuzz.json) shows them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..io import atomic_write_bytes, read_json  # noqa: E402
from .html import Figure, Report, Table, Text  # noqa: E402
from .run_folder import RunFolder  # noqa: E402

FUZZ_FILE = "fuzz.json"
COLORS = ("#3b7dd8", "#d98c1f")


def _axis_label(result: dict[str, Any]) -> str:
    ev = result["eval"]
    if ev["name"] == "preference":
        return f"{ev['target']} share (exact, over {ev['category']} candidates)"
    return "P(misaligned) (multiple choice)"


def draw_comparison(ax: Any, result: dict[str, Any], c: dict[str, Any]) -> None:
    """One comparison on `ax`: the eval vs noise scale for A and B, mean over questions with
    its 95% CI band; the verdict as the title."""
    for name, color in zip((c["a"], c["b"]), COLORS, strict=True):
        pts = result["curves"][name]["points"]
        x = [p["scale"] for p in pts]
        ax.plot(x, [p["mean"] for p in pts], "o-", color=color, label=name[-40:])
        lo, hi = zip(*(p["ci95"] for p in pts), strict=True)
        ax.fill_between(x, lo, hi, color=color, alpha=0.2)
    ax.set_xlabel(f"noise scale ({result['noise']}) at {len(result['hooks'])} hooks")
    ax.set_ylabel(_axis_label(result))
    ax.set_title(f"verdict: {c['verdict']}", fontsize=10)
    ax.legend(fontsize=8)


def fuzz_figure(result: dict[str, Any]) -> Figure:
    """One panel per comparison (draw_comparison)."""
    comps = result["comparisons"]
    fig, axes = plt.subplots(1, len(comps), figsize=(5.2 * len(comps), 3.8), squeeze=False)
    for ax, c in zip(axes[0], comps, strict=True):
        draw_comparison(ax, result, c)
    hooks = ", ".join(result["hooks"])
    return Figure.from_matplotlib(
        fig, f"Eval vs activation noise at {hooks}; bands: 95% CI across questions"
    )


def write_fuzz_png(result: dict[str, Any], path: str | Path) -> Path:
    return atomic_write_bytes(path, fuzz_figure(result).png)


def _ci(e: dict[str, Any]) -> str:
    return f"{e['mean']:+.4f} [{e['ci95'][0]:+.4f}, {e['ci95'][1]:+.4f}]"


def verdict_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per comparison: A, B, the verdict and its evidence (A - B with 95% CIs)."""
    rows = []
    for c in result["comparisons"]:
        row = {"A": c["a"], "B": c["b"], "verdict": c["verdict"]}
        row["A - B under noise"] = _ci(c["level"])
        if "rise" in c:
            row["A - B at scale 0"] = _ci(c["at_zero"])
            row["A - B of the rise"] = _ci(c["rise"])
            row["rise verdict"] = c["rise_verdict"]
        rows.append(row)
    return rows


def fuzz_sections(r: Report, run: RunFolder) -> None:
    """The run's fuzz stage (pipeline.fuzz_stage: fuzz.json): the curves and the verdicts."""
    st = run.first("fuzz")
    if st is None or not (st.path / FUZZ_FILE).exists():
        return
    result = read_json(st.path / FUZZ_FILE)
    sec = r.section("Activation fuzzing", anchor="fuzz")
    sec.add(
        Text(
            "Gaussian noise of increasing scale added to the activations at the hooks; the "
            "verdict names the model with more of the behaviour under noise (A - B of the eval "
            "averaged over the scales > 0, bootstrap 95% CI over questions)."
        )
    )
    sec.add(fuzz_figure(result))
    sec.add(Table(verdict_rows(result), caption="Which model is more readily pushed"))
