"""PNG plots for the readers (matplotlib, Agg backend): token bars, heatmaps, lens tables,
per-token projection strips. Every function writes atomically and returns the path."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..io import atomic_write_bytes  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _label(tok: str) -> str:
    return repr(tok)[1:-1][:24]


def token_bars_png(result, path: str | Path, n: int = 20) -> Path:
    """Horizontal bars of the top and bottom tokens of a DLAResult (or LensRow)."""
    top, bottom = result.top[:n], result.bottom[:n]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.28 * max(len(top), 4) + 1.2))
    for ax, items, color, title in (
        (axes[0], top, "tab:blue", "promoted"),
        (axes[1], bottom, "tab:red", "suppressed"),
    ):
        ax.barh(range(len(items)), [t.score for t in items], color=color)
        ax.set_yticks(range(len(items)), [_label(t.token) for t in items], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
    hook = getattr(result, "hook", "")
    extra = " (centred)" if getattr(result, "center", True) else " (not centred)"
    fig.suptitle(f"DLA {hook}{extra}", fontsize=11)
    return _save(fig, path)


def heatmap_png(sim, path: str | Path, vmin: float = -1.0, vmax: float = 1.0) -> Path:
    """A SimMatrix as a heatmap with values written in the cells when small enough."""
    vals = sim.values.numpy()
    n, m = vals.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * m, 1.0 + 0.35 * n))
    im = ax.imshow(vals, cmap="RdBu_r", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(m), [c[-28:] for c in sim.cols], rotation=90, fontsize=7)
    ax.set_yticks(range(n), [r[-28:] for r in sim.rows], fontsize=7)
    if n * m <= 400:
        for i in range(n):
            for j in range(m):
                ax.text(j, i, f"{vals[i, j]:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title(sim.title, fontsize=9)
    return _save(fig, path)


def lens_table_png(readout, path: str | Path, n: int = 8, max_rows: int = 48) -> Path:
    """A table: one row per (hook, position), the top-n promoted tokens as text."""
    # final logits first, then hooks where there is a difference (zero rows carry no reading)
    rows = [r for r in readout.logits + readout.rows if r.diff_norm > 0][:max_rows]
    cells = [
        [r.hook, r.position, f"{r.diff_norm:.3g}", " ".join(_label(t.token) for t in r.top[:n])]
        for r in rows
    ]
    fig, ax = plt.subplots(figsize=(13, 0.24 * len(cells) + 0.8))
    ax.axis("off")
    tab = ax.table(
        cellText=cells,
        colLabels=["hook", "pos", "|diff|", f"top {n} tokens (centred)"],
        loc="center",
        cellLoc="left",
        colWidths=[0.2, 0.04, 0.06, 0.7],
    )
    tab.auto_set_font_size(False)
    tab.set_fontsize(7)
    ax.set_title("activation-difference lens", fontsize=10)
    return _save(fig, path)


def projection_strips_png(items, path: str | Path, hook: str = "", max_tokens: int = 60) -> Path:
    """One strip per text: tokens coloured by their projection onto the vector."""
    items = list(items)
    fig, ax = plt.subplots(figsize=(14, 0.55 * max(len(items), 1) + 0.6))
    ax.axis("off")
    allv = [v for it in items for v in it.values[1:max_tokens]] or [0.0]
    lim = max(abs(min(allv)), abs(max(allv)), 1e-6)
    cmap = plt.get_cmap("RdBu_r")
    xmax = 1.0
    for row, it in enumerate(items):
        x = 0.0
        y = len(items) - row
        ax.text(-0.5, y, f"#{it.index} z={it.z:.1f}", ha="right", va="center", fontsize=7)
        for t, v in list(zip(it.tokens, it.values, strict=False))[:max_tokens]:
            w = 0.1 + 0.06 * len(t)
            c = cmap(0.5 + 0.5 * max(-1.0, min(1.0, v / lim)))
            ax.add_patch(plt.Rectangle((x, y - 0.4), w, 0.8, color=c))
            ax.text(x + w / 2, y, _label(t), ha="center", va="center", fontsize=5)
            x += w
        xmax = max(xmax, x)
    ax.set_xlim(-0.15 * xmax - 1, xmax)
    ax.set_ylim(0, len(items) + 1)
    ax.set_title(f"projection per token at {hook} (red = toward the vector)", fontsize=9)
    return _save(fig, path)


def entanglement_bars_png(result, path: str | Path) -> Path:
    """Horizontal bars of an EntanglementResult's top numbers: mean log-ratio (teacher vs
    base) with its 95% CI across prompts."""
    top = result.top
    fig, ax = plt.subplots(figsize=(6, 0.3 * max(len(top), 4) + 1.2))
    vals = [e.log_ratio for e in top]
    err = [[e.log_ratio - e.ci95[0] for e in top], [e.ci95[1] - e.log_ratio for e in top]]
    ax.barh(range(len(top)), vals, xerr=err, color="tab:purple", capsize=2)
    ax.set_yticks(range(len(top)), [e.number for e in top], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel("mean log P(n | trait prompt) - log P(n | no prompt)", fontsize=8)
    ax.set_title(f"{result.trait}: top entangled numbers ({result.n_prompts} prompts)", fontsize=9)
    return _save(fig, path)


def alignment_png(curves: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Alignment over training: for each labelled run, cos(student's activation shift, v*)
    and |shift| / |v*| against the optimizer step (rows of fit.alignment.AlignmentLogger
    .history: step, cos_with_teacher_vector, shift_norm_ratio)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, rows in curves.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["cos_with_teacher_vector"] for r in rows], marker=".", label=label)
        axes[1].plot(steps, [r["shift_norm_ratio"] for r in rows], marker=".", label=label)
    axes[0].axhline(0.0, color="grey", lw=0.8)
    axes[0].set_ylabel("cos(shift, v*)")
    axes[1].set_ylabel("|shift| / |v*|")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def scatter_ci_png(
    points: list[dict],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
    hline: float | None = 0.0,
) -> Path:
    """Labelled points with 95% intervals on both axes (e.g. approximability vs transfer per
    animal). points: dicts with x, y, label and optional x_ci, y_ci (lo, hi) and group (one
    colour and legend entry per group)."""
    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    groups = list(dict.fromkeys(p.get("group", "") for p in points))
    for i, g in enumerate(groups):
        pts = [p for p in points if p.get("group", "") == g]
        color = f"C{i}"
        for p in pts:
            xe = _err(p["x"], p.get("x_ci"))
            ye = _err(p["y"], p.get("y_ci"))
            ax.errorbar(p["x"], p["y"], xerr=xe, yerr=ye, fmt="o", color=color, ms=4, lw=0.8)
            ax.annotate(
                p["label"], (p["x"], p["y"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.plot([], [], "o", color=color, label=g or None)
    if hline is not None:
        ax.axhline(hline, color="0.6", lw=0.8, ls="--")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    if title:
        ax.set_title(title, fontsize=9)
    if any(groups):
        ax.legend(fontsize=7)
    return _save(fig, path)


def _err(v: float, ci) -> list[list[float]] | None:
    """matplotlib's asymmetric error bar from a (lo, hi) interval around v."""
    if ci is None:
        return None
    return [[max(v - ci[0], 0.0)], [max(ci[1] - v, 0.0)]]


def faithfulness_png(result, path: str | Path, title: str = "") -> Path:
    """Cosine between the finetune's and the vectors' mean activation differences from base,
    per layer (a FaithfulnessResult): one line for the first k positions, one for all.
    Layers where either difference is zero (no cosine) are left out of the lines."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for label, ys in (
        (f"first {result.first_k} positions", result.cos_first_k),
        ("all positions", result.cos_all),
    ):
        pts = [(x, y) for x, y in zip(result.layers, ys, strict=True) if y is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
    ax.axhline(0.0, color="0.6", lw=0.8, ls="--")
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("layer", fontsize=9)
    ax.set_ylabel(f"cos({result.reference_kind} diff, vectors diff)", fontsize=9)
    ax.set_title(title or "Do the vectors move the activations as the finetune does?", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)
