"""The report's whiten section: the teacher vector and each fitted vector set measured in the
Gaussians of the run's [whiten] stage (pipeline/whiten_stage.py: whiten.json).

A table (per vector set and hook: L2 norm, Mahalanobis norm, the data's spread along the
vector, mean Mahalanobis distance from the data unsteered and steered) and a bar chart of the
distances: how far off the data manifold each steering pushes the activations."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ..io import read_json
from .html import Figure, Report, Table, Text
from .run_folder import RunFolder


def whiten_rows(data: dict) -> list[dict]:
    """The section's table rows from whiten.json."""
    return [
        {
            "vectors": r["name"],
            "hook": r["hook"],
            "L2 norm": r["l2_norm"],
            "Mahalanobis norm": r["mahalanobis_norm"],
            "spread": r["spread"],
            "distance unsteered": r["distance_unsteered"],
            "distance steered": r["distance_steered"],
            "steered 95% CI": "[{:.2f}, {:.2f}]".format(*r["distance_steered_ci95"]),
        }
        for r in data["results"]
    ]


def distance_figure(data: dict) -> Figure:
    """Bars: mean Mahalanobis distance from the data, unsteered vs steered, per (set, hook)."""
    rows = data["results"]
    labels = [f"{r['name']}\n{r['hook']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(rows) + 1.5), 3.4))
    for off, key, name in (
        (-0.2, "distance_unsteered", "unsteered"),
        (0.2, "distance_steered", "steered"),
    ):
        m = np.array([r[key] for r in rows])
        ci = np.array([r[f"{key}_ci95"] for r in rows]).reshape(len(rows), 2)
        ax.bar(x + off, m, 0.4, yerr=np.abs(ci.T - m), capsize=3, label=name)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("mean Mahalanobis distance from the data")
    ax.legend(fontsize=8)
    return Figure.from_matplotlib(
        fig,
        "Mean Mahalanobis distance of the activations at each hook from the corpus "
        "Gaussian's mean, on held-out corpus text (95% CI across texts).",
    )


def whiten_sections(r: Report, run: RunFolder) -> None:
    """The whiten stage's section: the table and the distance bar chart."""
    st = run.first("whiten")
    if st is None:
        return
    data = read_json(st.path / "whiten.json")
    sec = r.section("Whitening: vectors in the data's units", anchor="whiten")
    g = data["gaussians"]
    sec.add(
        Text(
            "Gaussians (mean, covariance with "
            f"{data['config']['shrinkage']} shrinkage) fitted on {data['config']['texts']} corpus "
            f"texts at {', '.join(g)}. Mahalanobis norm: the vector's length in standard "
            "deviations of the data; spread: the data's standard deviation along it; distances "
            f"on {data['config']['eval_texts']} other corpus texts, each vector set added at coeff "
            "1 (the teacher at its coeff). In-distribution activations sit near sqrt(d) from the mean."
        )
    )
    if not data["results"]:
        sec.add(Text("No vector set has a vector at these hooks.", kind="note"))
        return
    sec.add(Table(whiten_rows(data), caption="whiten.json", digits=3))
    sec.add(distance_figure(data))
