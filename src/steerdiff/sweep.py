"""Layer x strength x readout sweeps: where is a trait well approximated by a steering vector?

For a trait system prompt (default: "You love owls...") we extract contrast vectors at
every layer's residual stream (`blocks.{l}.hook_resid_post`) for each readout, then for
every (readout, layer, strength) cell add strength x vector at all positions and measure:

- target_rate: the exact-scorer share of the target candidate (mean over questions);
- off_target: the most chosen other candidate and its share, and the largest rise of
  any other candidate over the unsteered model (off_target_gain);
- kl: coherence, KL(unsteered || steered) of the next-token distributions along fixed
  greedy unsteered responses to neutral prompts (data/neutral_prompts.txt), mean over
  response tokens, in nats.

The best cell is the highest target rate whose off-target figure and kl stay within bounds.
The off-target figure is chosen by `off_target_rule`: "gain" (default) bounds the largest
rise of any other candidate over the unsteered model; "rate" bounds the share of the most
chosen other candidate itself (the published protocol's wording, "off-target rates <=
0.10"; on a model whose unsteered favourite already takes more than the bound, no cell
passes it, which is why "gain" is the default).
Inside sweeps the exact scorer uses the first `n_questions` (default 5) of the 50
questions and the KL uses 4 neutral prompts x 12 tokens: a documented subset that keeps
360 cells within minutes on 2 CPU cores. The chosen cell is then re-scored on all 50
questions (`confirm_questions`), unsteered and steered, with 95% CIs.

Speed: with positions "all" (the default) a cell at layer L runs only blocks L+1.. from
the cached unsteered activations (evals.FastScorer / FastCoherence), and the unembedding
runs only where a log-prob is read; other positions use the full cached passes of
evals.scoring.
"""

from __future__ import annotations

import csv
import io as _io
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from . import io
from .chat import read_lines_resource
from .errors import SteerdiffError
from .evals import (
    Category,
    CoherenceProbe,
    FastCoherence,
    FastScorer,
    Steering,
    candidate_logprobs,
    exact_preference,
    load_category,
    question_prompts,
)
from .extract import Exclusion, default_contrast_questions, trait_vectors
from .hooks import n_layers
from .interpret.corpus import load_corpus
from .models import LoadedModel
from .progress import progress as progress_bar
from .vectors import VectorSet
from .whiten import Gaussian, check_for, fit_gaussians, whitened_units

HOOK_TEMPLATE = "blocks.{layer}.hook_resid_post"
OFF_TARGET_RULES = ("gain", "rate")
UNITS = ("l2", "whitened")


class SweepError(SteerdiffError, ValueError):
    """A sweep configuration is unusable; the message says how to fix it."""


@dataclass
class SweepConfig:
    target: str = "owl"
    category: str = "animals"  # built-in name or a YAML/JSON category file
    layers: list[int] | None = None  # None: every layer
    strengths: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    readouts: list[str] = field(default_factory=lambda: ["last", "prompt_mean", "response_mean"])
    n_questions: int = 5  # questions of the exact scorer per cell (first n of 50)
    confirm_questions: int = 50  # re-score the best cell on this many questions (0: skip)
    n_contrast: int = 30  # contrast questions (first n of data/contrast_questions.txt)
    n_neutral: int = 4  # neutral prompts for the KL coherence measure
    kl_tokens: int = 12  # greedy unsteered response tokens per neutral prompt
    off_target_bound: float = 0.10  # max off-target figure (see off_target_rule)
    # "gain": rise of any other candidate over unsteered; "rate": share of the top other one
    off_target_rule: Literal["gain", "rate"] = "gain"
    kl_bound: float = 0.5  # max KL (nats per token) from the unsteered model
    positions: str = "all"
    exclude_first_n: int = 1
    exclude_norm_ratio: float | None = 8.0
    seed: int = 0
    # "l2": strength x the raw vector; "whitened": strength in whitened units (standard
    # deviations of the data along the vector: each layer's vector / its Mahalanobis norm,
    # under a Gaussian fitted at that layer on `whiten_texts` corpus texts, steerdiff.whiten)
    units: Literal["l2", "whitened"] = "l2"
    whiten_texts: int = 100
    whiten_max_tokens: int = 64

    def check(self, n_model_layers: int) -> None:
        if not self.strengths:
            raise SweepError("strengths is empty; give at least one, e.g. --strengths 1,2,4,8.")
        if not self.readouts:
            raise SweepError(
                "readouts is empty; use e.g. --readouts last,prompt_mean,response_mean."
            )
        if self.off_target_rule not in OFF_TARGET_RULES:
            raise SweepError(
                f"off_target_rule {self.off_target_rule!r} is not one of {OFF_TARGET_RULES}; "
                "use 'gain' (rise over unsteered) or 'rate' (share of the top other candidate)."
            )
        if self.units not in UNITS:
            raise SweepError(f"units {self.units!r} is not one of {UNITS}; use 'l2' or 'whitened'.")
        bad = [la for la in (self.layers or []) if not 0 <= la < n_model_layers]
        if bad or self.layers == []:
            raise SweepError(
                f"Layers {bad or '[]'} are not valid; the model has layers 0-{n_model_layers - 1}."
            )


@dataclass
class Cell:
    readout: str
    layer: int
    hook: str
    strength: float
    target_rate: float
    off_target: str
    off_target_rate: float
    off_target_gain: float
    kl: float
    vector_norm: float  # L2 norm of the raw vector
    mahalanobis_norm: float | None = None  # its whitened norm (units "whitened")
    l2_coeff: float | None = None  # the L2 coefficient actually applied (strength / norm_M)


# ----------------------------------------------------------------------------- sweep


@dataclass
class SweepResult:
    config: SweepConfig
    baseline: dict  # unsteered exact-scorer distribution and target rate
    cells: list[Cell]
    best: Cell | None  # within bounds
    best_unbounded: Cell | None
    vector_meta: dict[str, dict]
    timings: dict[str, float]
    provenance: dict
    vectors: dict[str, VectorSet] = field(default_factory=dict)  # readout -> swept vectors
    confirm: dict | None = None  # the best cell (or best unbounded) on confirm_questions

    def to_dict(self) -> dict:
        return {
            "provenance": self.provenance,
            "config": asdict(self.config),
            "baseline": self.baseline,
            "best": asdict(self.best) if self.best else None,
            "best_unbounded": asdict(self.best_unbounded) if self.best_unbounded else None,
            "confirm": self.confirm,
            "timings": self.timings,
            "vector_meta": self.vector_meta,
            "cells": [asdict(c) for c in self.cells],
        }

    def csv_text(self) -> str:
        buf = _io.StringIO()
        names = list(Cell.__dataclass_fields__)
        w = csv.DictWriter(buf, fieldnames=names)
        w.writeheader()
        for c in self.cells:
            w.writerow(asdict(c))
        return buf.getvalue()

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """sweep.json, sweep.csv, heatmaps (PNG); every file written atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": io.atomic_write_json(out / "sweep.json", self.to_dict()),
            "csv": io.atomic_write_text(out / "sweep.csv", self.csv_text()),
        }
        for r, vs in self.vectors.items():
            paths[f"vectors_{r}"] = vs.save(out / f"vectors_{r}.safetensors")
        for metric in ("target_rate", "kl", "off_target_gain"):
            paths[f"png_{metric}"] = io.atomic_write_bytes(
                out / f"heatmap_{metric}.png", heatmap_png(self, metric)
            )
        return paths


def off_target_figure(cell: Cell, rule: str = "gain") -> float:
    """The figure an off-target bound applies to: "gain" (the largest rise of any other
    candidate over the unsteered model) or "rate" (the top other candidate's share)."""
    if rule == "gain":
        return cell.off_target_gain
    if rule == "rate":
        return cell.off_target_rate
    raise SweepError(f"Unknown off-target rule {rule!r}; use one of {OFF_TARGET_RULES}.")


def best_cell(
    cells: Sequence[Cell],
    off_target_bound: float | None,
    kl_bound: float | None,
    rule: str = "gain",
) -> Cell | None:
    """The highest target rate among cells whose off-target figure (see off_target_figure)
    is <= off_target_bound and whose KL is <= kl_bound (None: no bound); None if none."""
    ok = [
        c
        for c in cells
        if (off_target_bound is None or off_target_figure(c, rule) <= off_target_bound)
        and (kl_bound is None or c.kl <= kl_bound)
    ]
    return max(ok, key=lambda c: c.target_rate) if ok else None


def heatmap_png(result: SweepResult, metric: str) -> bytes:
    """One panel per readout: layers (rows) x strengths (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result.config
    readouts = list(dict.fromkeys(c.readout for c in result.cells))
    layers = sorted({c.layer for c in result.cells})
    strengths = sorted({c.strength for c in result.cells})
    fig, axes = plt.subplots(
        1,
        len(readouts),
        figsize=(2.2 + 1.6 * len(readouts) * max(1, len(strengths) / 3), 2.6 + 0.22 * len(layers)),
        squeeze=False,
    )
    vals = [getattr(c, metric) for c in result.cells]
    vmin, vmax = min(vals), max(vals)
    for ax, r in zip(axes[0], readouts, strict=True):
        grid = torch.full((len(layers), len(strengths)), float("nan"))
        for c in result.cells:
            if c.readout == r:
                grid[layers.index(c.layer), strengths.index(c.strength)] = getattr(c, metric)
        im = ax.imshow(
            grid.numpy(), aspect="auto", origin="lower", vmin=vmin, vmax=vmax, cmap="viridis"
        )
        ax.set_title(r, fontsize=9)
        ax.set_xticks(range(len(strengths)), [f"{s:g}" for s in strengths], fontsize=7)
        ax.set_yticks(range(len(layers)), [str(la) for la in layers], fontsize=6)
        ax.set_xlabel("strength", fontsize=8)
        if result.best and result.best.readout == r:
            ax.plot(
                strengths.index(result.best.strength), layers.index(result.best.layer), "r*", ms=10
            )
    axes[0][0].set_ylabel("layer (hook_resid_post)", fontsize=8)
    fig.subplots_adjust(top=0.8, bottom=0.15)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    base = result.baseline.get("target_rate") if metric == "target_rate" else None
    note = f" (unsteered {base:.3f})" if base is not None else ""
    fig.suptitle(
        f"{metric}{note}, target {cfg.target!r}; star: best within bounds", fontsize=9, y=0.98
    )
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _distribution(
    lm: LoadedModel, prompts, cat: Category, steering: Steering | None
) -> torch.Tensor:
    """Exact-scorer candidate shares, mean over questions -> [G, n_candidates]."""
    lp = candidate_logprobs(lm, prompts, cat.candidates, steering)  # [G, Q, C]
    return torch.softmax(lp, dim=-1).mean(1)


def _cell(r, layer, hook, s, dist, base, ti, cat, kl, norm) -> Cell:
    """dist, base: [C] candidate shares steered / unsteered; ti: target index."""
    others = dist.clone()
    others[ti] = -1.0
    oi = int(others.argmax())
    gain = dist - base
    gain[ti] = -1.0
    return Cell(
        r,
        layer,
        hook,
        s,
        float(dist[ti]),
        cat.candidates[oi],
        float(dist[oi]),
        float(gain.max()),
        kl,
        norm,
    )


def sweep_vectors(
    lm: LoadedModel,
    cfg: SweepConfig,
    sets: dict[str, VectorSet],
    hooks: list[str],
    gaussians: Mapping[str, Gaussian] | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """The vectors the cells add ({readout: {hook: vector}}) and each hook's Mahalanobis norm
    per readout key "readout/hook": the raw vectors for units "l2"; for "whitened" each one
    rescaled to 1 whitened unit under its layer's Gaussian (given, else fitted on corpus text)."""
    if cfg.units == "l2":
        return {r: dict(vs) for r, vs in sets.items()}, {}
    if gaussians is None:
        texts = load_corpus(n=cfg.whiten_texts, seed=cfg.seed).texts
        gaussians = fit_gaussians(lm, hooks, texts, cfg.whiten_max_tokens)
    for h in hooks:
        if h in gaussians:
            check_for(gaussians[h], lm, h)
    out, norms = {}, {}
    for r, vs in sets.items():
        out[r] = whitened_units({h: vs[h] for h in hooks}, gaussians)
        norms |= {f"{r}/{h}": float(gaussians[h].mahalanobis_norm(vs[h])) for h in hooks}
    return out, norms


def run_sweep(
    lm: LoadedModel,
    config: SweepConfig | None = None,
    progress: bool = True,
    gaussians: Mapping[str, Gaussian] | None = None,
) -> SweepResult:
    """Extract trait vectors and score every (readout, layer, strength) cell.

    progress: a bar on a terminal, plain periodic lines when stderr is a log file.
    gaussians: {hook: Gaussian} for units "whitened" (None: fitted on the corpus)."""
    cfg = config or SweepConfig()
    n_model = n_layers(lm.model)
    cfg.check(n_model)
    layers = cfg.layers if cfg.layers is not None else list(range(n_model))
    cat = load_category(cfg.category)
    names = [c.lower() for c in cat.candidates]
    if cfg.target.lower() not in names:
        raise SweepError(
            f"Target {cfg.target!r} is not a candidate of {cfg.category!r}: {cat.candidates}."
        )
    ti = names.index(cfg.target.lower())
    timings: dict[str, float] = {}

    t0, c0 = time.perf_counter(), time.process_time()
    prompts = question_prompts(lm, cat.questions[: cfg.n_questions], None)
    base = _distribution(lm, prompts, cat, None)[0]
    neutral = read_lines_resource("neutral_prompts.txt")[: cfg.n_neutral]
    if not neutral:
        raise SweepError("The neutral prompt set is empty; give at least one prompt.")
    probe = CoherenceProbe(lm, neutral, cfg.kl_tokens)
    timings["baseline_s"] = time.perf_counter() - t0
    timings["baseline_cpu_s"] = time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    hooks = [HOOK_TEMPLATE.format(layer=la) for la in layers]
    sets: dict[str, VectorSet] = trait_vectors(
        lm,
        cfg.target,
        cat.name,
        cfg.readouts,
        hooks,
        questions=default_contrast_questions()[: cfg.n_contrast],
        exclude=Exclusion(cfg.exclude_first_n, cfg.exclude_norm_ratio),
        seed=cfg.seed,
    )
    steer_sets, m_norms = sweep_vectors(lm, cfg, sets, hooks, gaussians)
    timings["extract_s"] = time.perf_counter() - t0
    timings["extract_cpu_s"] = time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    cells: list[Cell] = []
    grid = [(r, la) for r in cfg.readouts for la in layers]
    bar = progress_bar(len(grid) * len(cfg.strengths), f"sweep {cfg.target}", disable=not progress)
    # positions "all": partial forwards from the steered layer (evals.fast_scoring); other
    # positions: the full cached model passes, all strengths of one vector batched.
    fast = cfg.positions == "all"
    if fast:
        scorer, coherence = FastScorer(lm, prompts, cat.candidates), FastCoherence(probe)
    for r, la in grid:
        hook = HOOK_TEMPLATE.format(layer=la)
        v = steer_sets[r][hook]
        m = m_norms.get(f"{r}/{hook}")
        if fast:
            dists = [torch.softmax(scorer.logprobs(la, v, s), -1).mean(0) for s in cfg.strengths]
            kls = [coherence.kl(la, v, s) for s in cfg.strengths]
        else:
            steering = Steering({hook: v}, coeff=list(cfg.strengths), positions=cfg.positions)
            dists, kls = _distribution(lm, prompts, cat, steering), probe.kl(steering)
        for s, dist, kl in zip(cfg.strengths, dists, kls, strict=True):
            cell = _cell(
                r, la, hook, s, dist, base, ti, cat, float(kl), float(sets[r][hook].norm())
            )
            cell.mahalanobis_norm, cell.l2_coeff = m, s / m if m else s
            cells.append(cell)
        bar.update(len(cfg.strengths))
    bar.close()
    timings["cells_s"] = time.perf_counter() - t0
    timings["cells_cpu_s"] = time.process_time() - c0
    timings["per_cell_s"] = timings["cells_s"] / max(len(cells), 1)

    baseline = {
        "target_rate": float(base[ti]),
        "distribution": dict(zip(cat.candidates, base.tolist(), strict=True)),
        "n_questions": len(prompts),
    }
    meta = {
        r: {k: v for k, v in vs.metadata.items() if k not in ("hooks", "pca_explained")}
        for r, vs in sets.items()
    }
    best = best_cell(cells, cfg.off_target_bound, cfg.kl_bound, cfg.off_target_rule)
    t0, c0 = time.perf_counter(), time.process_time()
    confirm = _confirm(lm, cfg, cat, best or best_cell(cells, None, None), steer_sets)
    timings["confirm_s"] = time.perf_counter() - t0
    timings["confirm_cpu_s"] = time.process_time() - c0
    return SweepResult(
        config=cfg,
        baseline=baseline,
        cells=cells,
        best=best,
        best_unbounded=best_cell(cells, None, None),
        vector_meta=meta,
        timings=timings,
        provenance=io.provenance(lm, config=asdict(cfg), seed=cfg.seed),
        vectors=sets,
        confirm=confirm,
    )


def _confirm(lm, cfg: SweepConfig, cat: Category, cell: Cell | None, sets) -> dict | None:
    """Exact scorer on confirm_questions questions, unsteered and at the chosen cell."""
    if cell is None or cfg.confirm_questions <= 0:
        return None
    n = cfg.confirm_questions
    steering = Steering({cell.hook: sets[cell.readout][cell.hook]}, cell.strength, cfg.positions)
    base = exact_preference(lm, cfg.target, cat, n_questions=n)
    steered = exact_preference(lm, cfg.target, cat, n_questions=n, steering=steering)
    return {
        "cell": asdict(cell),
        "n_questions": steered.n_questions,
        "unsteered": {"target_rate": base.target_rate, "ci95": base.ci95},
        "steered": {
            "target_rate": steered.target_rate,
            "ci95": steered.ci95,
            "distribution": steered.distribution,
        },
    }
