"""Fuzzing curves for several variants of one model, saved per (variant, scale, seed) so an
interrupted run resumes, and the comparisons of the pairs asked for: the one routine behind
`steerdiff fuzz`, the [fuzz] stage and bench/bench_fuzz.py."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..hookpoints import n_layers, select_hooks
from ..io import atomic_write_json, file_sha256, read_json
from ..models import LoadedModel
from ..whiten import Gaussian, check_for
from .config import DEFAULT_DEPTHS, FuzzConfig
from .curve import FuzzCurve, compare, fuzz_curve, make_eval
from .noise import FuzzError
from .variants import Variant


def fuzz_hooks(lm: LoadedModel, cfg: FuzzConfig) -> list[str]:
    """cfg.hooks (patterns), else blocks.{l}.hook_resid_post for cfg.layers, else for the
    layers at DEFAULT_DEPTHS of the model's depth."""
    if cfg.hooks and cfg.layers:
        raise FuzzError("Give hooks or layers, not both (layers mean blocks.L.hook_resid_post).")
    if cfg.hooks:
        return select_hooks(lm, cfg.hooks)
    n = n_layers(lm)
    layers = cfg.layers or [round(f * n) for f in DEFAULT_DEPTHS]
    for layer in layers:
        if not 0 <= layer < n:
            raise FuzzError(f"Layer {layer} is not in this model (layers 0-{n - 1}): pick one.")
    return [f"blocks.{layer}.hook_resid_post" for layer in layers]


def load_gaussians(
    lm: LoadedModel, cfg: FuzzConfig, hooks: Sequence[str]
) -> dict[str, Gaussian] | None:
    """Whitened noise: one Gaussian file per hook (cfg.whiten), each checked for its hook and
    this model; isotropic noise takes none."""
    if cfg.noise == "isotropic":
        if cfg.whiten:
            raise FuzzError(
                "Whitening files were given with isotropic noise: add --noise whitened."
            )
        return None
    gs = [Gaussian.load(p) for p in cfg.whiten]
    by_hook = {g.hook: g for g in gs}
    missing = [h for h in hooks if h not in by_hook]
    if missing:
        raise FuzzError(
            f"Whitened noise needs a Gaussian for every hook; none given for {', '.join(missing)}"
            f" (given: {', '.join(by_hook) or 'none'}): fit them with steerdiff whiten."
        )
    for h in hooks:
        check_for(by_hook[h], lm, h)
    return {h: by_hook[h] for h in hooks}


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[:60] or "model"


def _fingerprint(lm: LoadedModel, variant: Variant, ev_info: dict, rest: dict) -> str:
    """What a saved point depends on; a point made under other settings is not reused."""
    key = {"model": lm.weights_hash, "variant": variant.describe(), "eval": ev_info, **rest}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_fuzz(
    lm: LoadedModel,
    variants: dict[str, Variant],
    pairs: Sequence[tuple[str, str]],
    cfg: FuzzConfig,
    work: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Curves for every variant (labels -> variants) and compare(a, b) for each pair of labels.
    With `work`, each (variant, scale, seed) is saved under work/parts and reused on a rerun
    with the same settings."""
    ev = make_eval(cfg.eval, cfg.target, cfg.category, cfg.n_questions, cfg.questions)
    hooks = fuzz_hooks(lm, cfg)
    gaussians = load_gaussians(lm, cfg, hooks)
    seeds = list(range(cfg.seeds))
    rest = {
        "items": ev.items,
        "hooks": hooks,
        "noise": cfg.noise,
        "whiten": [file_sha256(p) for p in cfg.whiten],
    }
    curves: dict[str, FuzzCurve] = {}
    for label, v in variants.items():
        fp = _fingerprint(lm, v, {"name": ev.name, **ev.info}, rest)
        folder = None if work is None else Path(work) / "parts" / f"{_slug(label)}-{fp}"
        done = {}
        if folder is not None and folder.is_dir():
            for f in folder.glob("*.json"):
                d = read_json(f)
                done[(float(d["scale"]), int(d["seed"]))] = d["values"]

        def save(s: float, sd: int, values: list[float], folder: Path | None = folder) -> None:
            if folder is not None:
                row = {"scale": s, "seed": sd, "values": values}
                atomic_write_json(folder / f"scale{s:g}-seed{sd}.json", row)

        curves[label] = fuzz_curve(
            lm, v.context, hooks, cfg.scales, ev, seeds, gaussians, label, done, save, progress
        )
    for a, b in pairs:
        if a not in curves or b not in curves:
            raise FuzzError(f"Pair ({a}, {b}) names a model not in {list(curves)}.")
    return {
        "eval": {"name": ev.name, **ev.info, "n_questions": len(ev.items)},
        "hooks": hooks,
        "noise": cfg.noise,
        "scales": cfg.scales,
        "seeds": seeds,
        "variants": {k: v.describe() for k, v in variants.items()},
        "curves": {k: c.to_dict() for k, c in curves.items()},
        "comparisons": [compare(curves[a], curves[b]) for a, b in pairs],
    }
