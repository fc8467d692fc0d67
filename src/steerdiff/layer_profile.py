"""Layer profiles across model families: where along a model's depth does a trait vector
steer best, when adding it and when subtracting it?

For each model, the same trait sweep (`sweep.run_sweep`: the trait system-prompt contrast
vector at every chosen `blocks.{l}.hook_resid_post`, strengths including negative ones),
then per layer and direction (add: strength > 0, subtract: strength < 0) the cell with the
largest shift of the target share in that direction whose coherence KL stays within
`kl_bound` (else the gentlest strength, flagged `within_kl: false`). That cell is re-scored
on `ci_questions` FURTHER questions (questions n_questions.. n_questions+ci_questions-1,
disjoint from the ones that chose it, so the pick's luck does not inflate it): per question,
effect = steered target share - unsteered target share (exact scorer, evals.FastScorer),
mean with a 95% CI over questions (intervals.mean_ci95); log_effect = the change of the log
share (nats), which has no floor where the unsteered share is already near 0 (subtracting
a trait the model barely shows can lower its share by at most that little).

x = relative depth = layer / (n_layers - 1), so models with 30 and 18 layers share one axis.
The peak per model: the layer of the largest effect (add) and of the most negative (subtract).
`perception=True` adds the perception-vs-behaviour probe (steerdiff.perception_probe).
"""

from __future__ import annotations

import io as _io
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from . import io
from .errors import SteerdiffError
from .evals import FastScorer, load_category, question_prompts
from .hooks import n_layers
from .intervals import mean_ci95
from .models import LoadedModel
from .perception_probe import PerceptionResult, perception_probe
from .sweep import Cell, SweepConfig, run_sweep

DIRECTIONS = {"add": 1.0, "subtract": -1.0}


class ProfileError(SteerdiffError, ValueError):
    """A profile configuration is unusable; the message says how to fix it."""


class ProfileConfig(BaseModel):
    """`steerdiff sweep --profile` options and the experiment file's [profile] table."""

    model_config = ConfigDict(extra="forbid")

    # models to profile (load_model names); in an experiment: profiled after the run's model
    models: list[str] = []
    target: str = "owl"
    category: str = "animals"
    readout: str = "last"
    strengths: list[float] = [-8.0, -4.0, -2.0, 2.0, 4.0, 8.0]  # < 0: subtract the vector
    layers: str = "every:3"  # "all", "every:k" (0, k, 2k, ... and the last layer) or "0,6,12"
    n_questions: int = 5  # exact-scorer questions per sweep cell (choose the strength)
    ci_questions: int = 20  # further questions that re-score the chosen cell, with CIs
    kl_bound: float | None = 1.0  # max KL (nats/token) of a chosen cell; None: no bound
    n_contrast: int = 30
    n_neutral: int = 4
    kl_tokens: int = 12
    perception: bool = False  # also run the perception-vs-behaviour probe
    perception_coeff: float = 1.0  # x the sentiment diff-of-means vector, +/-
    seed: int = 0

    def check(self) -> None:
        if not self.strengths:
            raise ProfileError(
                "strengths is empty; give some, negative ones to subtract: --strengths -8,-4,4,8."
            )
        if 0.0 in self.strengths:
            raise ProfileError("strengths holds 0 (no steering); drop it, the baseline is kept.")
        if self.n_questions < 1 or self.ci_questions < 2:
            raise ProfileError("n_questions must be >= 1 and ci_questions >= 2 (a CI needs two).")
        if self.n_questions + self.ci_questions > 50:
            raise ProfileError(
                f"n_questions + ci_questions = {self.n_questions + self.ci_questions} > 50, "
                "the exact scorer's question count; lower one of them."
            )
        parse_layers(self.layers, 1000)


def parse_layers(spec: str, n: int) -> list[int]:
    """'all' -> 0..n-1; 'every:k' -> 0, k, 2k, ... plus n-1; '0,6,12' -> those (checked)."""
    s = spec.strip()
    if s == "all":
        return list(range(n))
    m = re.fullmatch(r"every:(\d+)", s)
    if m and int(m.group(1)) >= 1:
        out = list(range(0, n, int(m.group(1))))
        return out if out[-1] == n - 1 else [*out, n - 1]
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out:
        raise ProfileError(f"layers {spec!r} is not 'all', 'every:k' (k >= 1) or e.g. '0,6,12'.")
    bad = [la for la in out if not 0 <= la < n]
    if bad:
        raise ProfileError(f"layers {bad} are not valid; this model has layers 0-{n - 1}.")
    return out


@dataclass
class ModelProfile:
    model: str
    family: str  # the model's model_type, e.g. llama, gemma3_text
    n_layers: int
    layers: list[int]
    depth: list[float]  # layer / (n_layers - 1)
    baseline: float  # unsteered target share on the ci questions
    # per layer: strength, kl, within_kl, sweep_effect, effect, ci95, n, log_effect, log_ci95
    add: list[dict]
    subtract: list[dict]
    peak: dict  # {"add": {...}, "subtract": {...}}: layer, depth, effect, ci95
    cells: list[dict]  # the sweep's cells (sweep.Cell fields)
    provenance: dict
    timings: dict = field(default_factory=dict)
    perception: dict | None = None  # PerceptionResult.to_dict()


@dataclass
class ProfileResult:
    config: ProfileConfig
    models: list[ModelProfile]

    def to_dict(self) -> dict:
        return {
            "config": self.config.model_dump(),
            "peaks": [
                {"model": m.model, "family": m.family, "n_layers": m.n_layers, **m.peak}
                for m in self.models
            ],
            "models": [asdict(m) for m in self.models],
        }

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """profile.json, profile.png (and perception.png), written atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": io.atomic_write_json(out / "profile.json", self.to_dict())}
        paths["png"] = io.atomic_write_bytes(out / "profile.png", png(profile_figure(self)))
        if all(m.perception for m in self.models):
            fig = perception_figure(self)
            paths["perception_png"] = io.atomic_write_bytes(out / "perception.png", png(fig))
        return paths


def pick_cell(cells: list[Cell], base: float, sign: float, kl_bound: float | None) -> dict:
    """The cell of one layer and direction with the largest sign x (target - base) within
    the KL bound; else the gentlest strength of that direction (within_kl False)."""
    mine = [c for c in cells if c.strength * sign > 0]
    ok = [c for c in mine if kl_bound is None or c.kl <= kl_bound]
    if ok:
        c = max(ok, key=lambda c: sign * (c.target_rate - base))
    else:
        c = min(mine, key=lambda c: abs(c.strength))
    return {
        "strength": c.strength,
        "kl": c.kl,
        "within_kl": bool(ok),
        "sweep_effect": c.target_rate - base,
    }


def peak(rows: list[dict], layers: list[int], depth: list[float], sign: float) -> dict:
    """The layer of the largest sign x effect (share) among the rows within the KL bound
    (all rows if none is), and under "log" the same by the log-share effect (which still
    ranks layers where subtracting has taken the share to its floor near 0)."""
    idx = [i for i, r in enumerate(rows) if r]
    idx = [i for i in idx if rows[i]["within_kl"]] or idx
    if not idx:
        return {}

    def at(i: int) -> dict:
        keys = ("effect", "ci95", "strength", "log_effect", "log_ci95", "within_kl")
        return {"layer": layers[i], "depth": depth[i]} | {k: rows[i][k] for k in keys}

    best = max(idx, key=lambda i: sign * rows[i]["effect"])
    best_log = max(idx, key=lambda i: sign * rows[i]["log_effect"])
    return at(best) | {"log": at(best_log)}


def peaks(m: ModelProfile) -> dict:
    """{"add": peak, "subtract": peak} of a model's rows."""
    return {d: peak(getattr(m, d), m.layers, m.depth, s) for d, s in DIRECTIONS.items()}


def profile_model(lm: LoadedModel, cfg: ProfileConfig, progress: bool = True) -> ModelProfile:
    """One model's add/subtract profile (see the module docstring)."""
    cfg.check()
    t0 = time.perf_counter()
    n = n_layers(lm.model)
    layers = parse_layers(cfg.layers, n)
    sweep_cfg = SweepConfig(
        target=cfg.target,
        category=cfg.category,
        layers=layers,
        strengths=list(cfg.strengths),
        readouts=[cfg.readout],
        n_questions=cfg.n_questions,
        confirm_questions=0,
        n_contrast=cfg.n_contrast,
        n_neutral=cfg.n_neutral,
        kl_tokens=cfg.kl_tokens,
        seed=cfg.seed,
    )
    res = run_sweep(lm, sweep_cfg, progress=progress)
    cat = load_category(cfg.category)
    ti = [c.lower() for c in cat.candidates].index(cfg.target.lower())
    qs = cat.questions[cfg.n_questions : cfg.n_questions + cfg.ci_questions]
    scorer = FastScorer(lm, question_prompts(lm, qs, None), cat.candidates)
    log0 = torch.log_softmax(scorer.logprobs(layers[0]), -1)[:, ti]  # [Q] unsteered
    share0 = log0.exp()
    base = res.baseline["target_rate"]
    rows: dict[str, list[dict]] = {d: [] for d in DIRECTIONS}
    for la in layers:
        v = res.vectors[cfg.readout][f"blocks.{la}.hook_resid_post"]
        cells = [c for c in res.cells if c.layer == la]
        for d, sign in DIRECTIONS.items():
            if not any(c.strength * sign > 0 for c in cells):
                rows[d].append({})
                continue
            row = pick_cell(cells, base, sign, cfg.kl_bound)
            log = torch.log_softmax(scorer.logprobs(la, v, row["strength"]), -1)[:, ti]
            mean, ci = mean_ci95((log.exp() - share0).tolist())
            lmean, lci = mean_ci95((log - log0).tolist())
            rows[d].append(
                row
                | {"effect": mean, "ci95": list(ci), "n": len(qs)}
                | {"log_effect": lmean, "log_ci95": list(lci)}
            )
    depth = [la / max(n - 1, 1) for la in layers]
    perception = None
    if cfg.perception:
        pr: PerceptionResult = perception_probe(lm, layers, cfg.perception_coeff, progress)
        perception = pr.to_dict()
    mp = ModelProfile(
        model=lm.spec,
        family=str(lm.model.config.model_type),
        n_layers=n,
        layers=layers,
        depth=depth,
        baseline=float(share0.mean()),
        add=rows["add"],
        subtract=rows["subtract"],
        peak={},
        cells=[asdict(c) for c in res.cells],
        provenance=io.provenance(lm, config=cfg, seed=cfg.seed),
        timings=res.timings,
        perception=perception,
    )
    mp.peak = peaks(mp)
    mp.timings["profile_s"] = time.perf_counter() - t0  # sweep, re-scoring and probe
    return mp


def layer_profile(
    models: list[LoadedModel],
    cfg: ProfileConfig,
    progress: bool = True,
    resume_dir: str | Path | None = None,
) -> ProfileResult:
    """Profile every model. resume_dir: each model's profile is saved there as it finishes
    (model_<i>.json) and reused on a rerun when its model, weights and config match."""
    cfg.check()
    out = []
    for i, lm in enumerate(models):
        path = Path(resume_dir) / f"model_{i}.json" if resume_dir else None
        if path is not None and path.exists():
            d = json.loads(path.read_text())
            prov = d["provenance"]
            if (prov.get("weights_hash"), prov.get("config")) == (
                lm.weights_hash,
                json.loads(json.dumps(cfg.model_dump())),
            ):
                out.append(ModelProfile(**d))
                continue
        mp = profile_model(lm, cfg, progress)
        if path is not None:
            io.atomic_write_json(path, asdict(mp))
        out.append(mp)
    for mp in out:
        mp.peak = peaks(mp)  # (a resumed model's as this version picks them)
    return ProfileResult(cfg, out)


# ----------------------------------------------------------------------------- figures


def label(m: ModelProfile) -> str:
    return f"{m.model} ({m.family}, {m.n_layers} layers)"


def _band(ax, x, rows: list[dict], key: str, ci: str, lab: str, color) -> None:
    """A line of rows[i][key] at x[i] (rows without a figure skipped), its CI as a band."""
    pts = [(xi, r) for xi, r in zip(x, rows, strict=True) if r]
    xs = [p[0] for p in pts]
    ax.plot(xs, [p[1][key] for p in pts], "o-", ms=3, color=color, label=lab)
    lo = [p[1][ci][0] for p in pts]
    hi = [p[1][ci][1] for p in pts]
    ax.fill_between(xs, lo, hi, color=color, alpha=0.2)
    over = [(p[0], p[1][key]) for p in pts if p[1].get("within_kl") is False]
    if over:  # no strength of this layer kept KL within the bound: the gentlest one, marked
        ax.plot(*zip(*over, strict=True), "x", color="black", ms=6)


def profile_figure(result: ProfileResult):
    """Effect vs relative depth: add | subtract | KL of the chosen cells, a line per model
    (CI bands), all panels on one shared relative-depth axis 0..1. Returns the Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    axes, logs = grid[0], grid[1]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, m in enumerate(result.models):
        c = colors[k % len(colors)]
        for j, d in enumerate(DIRECTIONS):
            _band(axes[j], m.depth, getattr(m, d), "effect", "ci95", label(m), c)
            _band(logs[j], m.depth, getattr(m, d), "log_effect", "log_ci95", label(m), c)
        for d, style in (("add", "-"), ("subtract", "--")):
            pts = [(x, r["kl"]) for x, r in zip(m.depth, getattr(m, d), strict=True) if r]
            axes[2].plot(*zip(*pts, strict=True), style, color=c, label=f"{m.model} {d}")
    cfg = result.config
    titles = ("add (+coeff x vector)", "subtract (-coeff x vector)", "coherence")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    for ax in (*axes[:2], *logs[:2]):
        ax.axhline(0, color="grey", lw=0.5)
    for ax in (*axes, *logs[:2]):
        ax.set_xlim(0, 1)
        ax.set_xlabel("relative depth = layer / (n_layers - 1)", fontsize=8)
    axes[0].set_ylabel(f"{cfg.target} share - unsteered (95% CI)", fontsize=8)
    logs[0].set_ylabel(f"change of log {cfg.target} share, nats (95% CI)", fontsize=8)
    axes[2].set_ylabel("KL nats/token of the chosen cell", fontsize=8)
    logs[2].axis("off")
    logs[2].text(
        0,
        0.5,
        "\n".join(
            f"{m.model}: unsteered {cfg.target} share {m.baseline:.4f}" for m in result.models
        )
        + "\n\nsubtracting can lower the share by at most\nthe unsteered share; the log "
        "share has no floor",
        fontsize=8,
        va="center",
    )
    fig.suptitle(
        f"layer profile of the {cfg.target!r} vector ({cfg.readout}); per layer the best "
        f"strength of {cfg.strengths} within KL <= {cfg.kl_bound} (x: none is; the gentlest)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def perception_figure(result: ProfileResult):
    """Per model: perception and behaviour effect (log-odds, 95% CI) vs relative depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = [m for m in result.models if m.perception]
    fig, axes = plt.subplots(
        1, len(ms), figsize=(5 * len(ms), 3.6), sharex=True, sharey=True, squeeze=False
    )
    for ax, m in zip(axes[0], ms, strict=True):
        p = m.perception
        x = p["relative_depth"]
        _band(ax, x, p["perception"], "mean", "ci95", "perception (review steered)", "C0")
        _band(ax, x, p["behaviour"], "mean", "ci95", "behaviour (reply steered)", "C3")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlim(0, 1)
        ax.set_title(f"{label(m)}, coeff +/-{p['coeff']:g}", fontsize=9)
        ax.set_xlabel("relative depth = layer / (n_layers - 1)", fontsize=8)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("log-odds shift (positive vs negative), nats", fontsize=8)
    fig.tight_layout()
    return fig


def png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
