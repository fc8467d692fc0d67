"""The experiment report's figures: the trait evaluation bars, the loss curves and the
belief bars (false facts)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..io import atomic_write_bytes, read_jsonl
from .html import Figure

if TYPE_CHECKING:
    from ..evals.beliefs import BeliefResult


def eval_figure(results: list[dict]) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(results)))
    names = [r["name"] for r in results][::-1]
    rates = [r["target_rate"] for r in results][::-1]
    los = [r["target_rate"] - r["ci95"][0] for r in results][::-1]
    his = [r["ci95"][1] - r["target_rate"] for r in results][::-1]
    colors = {"base": "#888", "teacher": "#d98c1f", "student": "#3b7dd8", "baseline": "#6a4"}
    ax.barh(
        names,
        rates,
        xerr=[los, his],
        color=[colors.get(r["role"], "#3b7dd8") for r in results][::-1],
        capsize=3,
    )
    ax.set_xlabel(f"{results[0]['target']} share (mean over questions, 95% CI)")
    ax.set_xlim(0, max(0.05, max(r["ci95"][1] for r in results) * 1.15))
    return Figure.from_matplotlib(
        fig, "Trait evaluation: target share per model with 95% CI across questions"
    )


def loss_figure(fits: list[tuple[str, Path]]) -> Figure | None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    drawn = False
    for name, folder in fits:
        path = folder / "metrics.jsonl"
        if not path.exists():
            continue
        rows = list(read_jsonl(path))
        tr = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
        va = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if tr:
            (line,) = ax.plot(*zip(*tr, strict=True), alpha=0.5, label=f"{name} train")
            if va:
                ax.plot(*zip(*va, strict=True), "o-", color=line.get_color(), label=f"{name} val")
            drawn = True
        base = next(
            (r.get("base_val_loss") for r in rows if r.get("base_val_loss") is not None), None
        )
        teach = next(
            (r.get("teacher_val_loss") for r in rows if r.get("teacher_val_loss") is not None), None
        )
        if base is not None:
            ax.axhline(base, color="#888", ls="--", lw=0.8)
        if teach is not None:
            ax.axhline(teach, color="#d98c1f", ls="--", lw=0.8)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on completion tokens")
    ax.legend(fontsize=7)
    return Figure.from_matplotlib(
        fig, "Loss curves (dashed: base model grey, teacher orange, on the validation split)"
    )


def beliefs_figure(results: dict[str, BeliefResult]) -> Figure:
    """Mean p_false per question kind, one bar per model (base / finetune / vectors ...),
    with 95% CI error bars across questions."""
    kinds = list(dict.fromkeys(k for r in results.values() for k in r.kinds()))
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(kinds) * max(1, len(results)) / 2, 3.5))
    width = 0.8 / max(1, len(results))
    for i, (name, r) in enumerate(results.items()):
        summ = r.by_kind()
        xs, means, errs = [], [], [[], []]
        for j, k in enumerate(kinds):
            if k not in summ:
                continue
            p = summ[k]["p_false"]
            xs.append(j + (i - (len(results) - 1) / 2) * width)
            means.append(p["mean"])
            errs[0].append(p["mean"] - p["ci95"][0])
            errs[1].append(p["ci95"][1] - p["mean"])
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=name)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.axhline(0.5, color="#888", ls="--", lw=0.8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("p_false (mean over questions, 95% CI)")
    ax.legend(fontsize=8)
    return Figure.from_matplotlib(
        fig, "Belief in the false facts: P(false) / (P(false) + P(true)) per question kind"
    )


def beliefs_png(results: dict[str, BeliefResult], path: str | Path) -> Path:
    """beliefs_figure written as a PNG (atomically)."""
    return atomic_write_bytes(path, beliefs_figure(results).png)
