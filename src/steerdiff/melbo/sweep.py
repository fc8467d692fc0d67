"""The radius sweep: how much a MELBO vector of norm R changes the target layer, vs R.

"Activation plateaus": a perturbation that is too small does (almost) nothing downstream,
then past some radius the change jumps. For each R one vector is trained (the objective of
steerdiff.melbo.train) and, as the baseline, `n_random` random vectors of the same norm
(in the same metric) are measured on the same prompts: the mean ||dZ|| over prompts and
positions at the target hook, and the objective.
"""

from __future__ import annotations

import io as _io
from collections.abc import Sequence

import torch

from ..intervals import mean_ci95
from ..models import LoadedModel, unwrap
from ..progress import progress as progress_bar
from ..whiten import Gaussian
from .config import MelboConfig
from .train import Prompts, TargetMap, prompt_ids, random_on_sphere, train_vector, whitening_basis


def radius_sweep(
    lm: LoadedModel,
    cfg: MelboConfig,
    radii: Sequence[float] | None = None,
    prompts: Prompts | None = None,
    gaussian: Gaussian | None = None,
    progress: bool = True,
) -> list[dict]:
    """One row per radius: the trained vector's and the random vectors' change at the target
    hook (mean ||dZ||; random: mean with a 95% CI over the random vectors), the objectives,
    their ratio, and the trained vector's objective curve. radii: default cfg.radii."""
    radii = sorted(cfg.radii if radii is None else radii)
    cfg = MelboConfig(**{**cfg.model_dump(), "radii": list(radii)})  # checks every R > 0
    ids = prompt_ids(lm, cfg, prompts)
    basis, _ = whitening_basis(lm, cfg, gaussian)
    tmap = TargetMap(lm, cfg.source_hook, cfg.target_hook, ids, cfg.batch_size, cfg.skip_first)
    dev = next(unwrap(lm).parameters()).device
    none = torch.zeros(0, tmap.dim)
    p, q = cfg.p, cfg.q_
    steps = cfg.sweep_steps or cfg.steps
    rows = []
    with progress_bar(len(radii), "melbo radius sweep", disable=not progress) as bar:
        for R in radii:
            gen = torch.Generator().manual_seed(cfg.seed)
            u, curve = train_vector(tmap, R, basis, none, cfg, steps, gen, f"R={R:g}", False)
            trained = tmap.stats(u if basis is None else basis @ u, p, q)
            rand = []
            for k in range(cfg.n_random):
                g = torch.Generator().manual_seed(10_000 + cfg.seed * 100 + k)
                r = random_on_sphere(tmap.dim, R, none, g).to(dev)
                rand.append(tmap.stats(r if basis is None else basis @ r, p, q))
            rc, rc_ci = mean_ci95([x["change"] for x in rand])
            ro, ro_ci = mean_ci95([x["objective"] for x in rand])
            rows.append(
                {
                    "radius": R,
                    "trained_change": trained["change"],
                    "trained_objective": trained["objective"],
                    "random_change": rc,
                    "random_change_ci95": list(rc_ci),
                    "random_objective": ro,
                    "random_objective_ci95": list(ro_ci),
                    "change_ratio": trained["change"] / rc if rc else None,
                    "base_norm": trained["base_norm"],
                    "relative_change": trained["change"] / trained["base_norm"],
                    "curve": curve,
                    "steps": steps,
                }
            )
            bar.update(1)
    return rows


def draw_plateau(ax, rows: list[dict]) -> None:
    """Mean ||dZ|| at the target hook vs R (log-log) on a matplotlib axis: the trained vector
    and the random ones of the same norm (mean, 95% CI band)."""
    R = [r["radius"] for r in rows]
    ax.plot(R, [r["trained_change"] for r in rows], "o-", color="C3", label="MELBO (trained)")
    ax.plot(R, [r["random_change"] for r in rows], "s--", color="C0", label="random, same norm")
    lo = [r["random_change_ci95"][0] for r in rows]
    hi = [r["random_change_ci95"][1] for r in rows]
    ax.fill_between(R, lo, hi, color="C0", alpha=0.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("radius R (norm of the vector at the source hook)", fontsize=8)
    ax.set_ylabel("mean ||dZ|| at the target hook", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")


def plateau_png(rows: list[dict], title: str = "") -> bytes:
    """The radius sweep alone as a PNG (draw_plateau)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    draw_plateau(ax, rows)
    ax.set_title(title or "activation change vs perturbation size", fontsize=9)
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
