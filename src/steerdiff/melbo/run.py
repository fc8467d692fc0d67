"""A whole MELBO job into one folder (what `steerdiff melbo` and the [melbo] stage run):

OUT/vector_NN.safetensors  one VectorSet per vector (a rerun skips the finished ones)
OUT/melbo.json             objective curves, the radius sweep, evals, samples, the
                           planted-vector recovery, provenance (rewritten after each part)
OUT/melbo.png              objective curves, and the plateau plot when there is a sweep
"""

from __future__ import annotations

import io as _io
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_bytes, atomic_write_json, provenance, read_json
from ..models import LoadedModel
from .config import MelboConfig
from .evals import evaluate_vectors, planted_recovery
from .store import MelboResult
from .sweep import draw_plateau, radius_sweep
from .train import Prompts, train_melbo

JSON_FILE = "melbo.json"
PNG_FILE = "melbo.png"


def run_melbo(
    lm: LoadedModel,
    cfg: MelboConfig,
    out: str | Path,
    planted: torch.Tensor | None = None,
    progress: bool = True,
    prompts: Prompts | None = None,
) -> dict[str, Any]:
    """Train (resumably), sweep R (cfg.radii), evaluate (cfg.evals) and, given a planted
    vector at the source hook, measure its recovery; returns what melbo.json holds.
    prompts: as train_melbo's (None: cfg.prompts or the packaged questions)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / JSON_FILE
    doc: dict[str, Any] = {"config": cfg.model_dump(), "provenance": provenance(lm, cfg, cfg.seed)}
    old = read_json(path) if path.exists() else {}
    res = train_melbo(lm, cfg, prompts, progress=progress, out=out)
    doc["training"] = {k: v for k, v in res.summary().items() if k != "provenance"}
    atomic_write_json(path, doc)
    if cfg.radii:
        same = "sweep" in old and _sweep_key(old.get("config", {})) == _sweep_key(doc["config"])
        doc["sweep"] = (
            old["sweep"] if same else radius_sweep(lm, cfg, prompts=prompts, progress=progress)
        )
        atomic_write_json(path, doc)
    if planted is not None:
        doc["planted"] = planted_recovery(res.vectors, planted.float().cpu())
        atomic_write_json(path, doc)
    if cfg.evals or cfg.n_samples:
        doc["evals"] = evaluate_vectors(lm, res, cfg, progress=progress)
        if "planted" in doc and doc["planted"]["best_vector"] is not None:
            best = doc["evals"]["vectors"][doc["planted"]["best_vector"]]
            doc["planted"]["best_vector_evals"] = {k: v for k, v in best.items() if k != "samples"}
        atomic_write_json(path, doc)
    atomic_write_bytes(out / PNG_FILE, melbo_png(res, doc.get("sweep")))
    return doc


# options that do not change the radius sweep (a rerun with other evals reuses it)
NOT_SWEEP = {
    "n_vectors",
    "evals",
    "target",
    "category",
    "n_questions",
    "n_samples",
    "sample_tokens",
}


def _sweep_key(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_SWEEP}


def melbo_png(res: MelboResult, sweep: list[dict] | None = None) -> bytes:
    """Left: each vector's objective over training (relative to its start); right: the
    radius sweep's mean ||dZ|| vs R (log-log), trained vs random (when there is a sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 if sweep else 1
    fig, axes = plt.subplots(1, n, figsize=(5.0 * n, 3.6), squeeze=False)
    ax = axes[0][0]
    for i, c in enumerate(res.curves):
        ax.plot([v / c[0] for v in c], label=f"vector {i}", lw=1)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("objective / objective at step 0", fontsize=8)
    ax.set_title(
        f"MELBO objective ({res.source_hook} -> {res.target_hook}, R={res.radius:g})", fontsize=8
    )
    if len(res.curves) <= 10:
        ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    if sweep:
        draw_plateau(axes[0][1], sweep)
        axes[0][1].set_title("activation change vs R (95% CI over random vectors)", fontsize=8)
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
