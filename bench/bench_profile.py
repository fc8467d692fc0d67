"""Layer profiles across families: SmolLM2-135M-Instruct (llama, 30 layers) vs Gemma 3 270M
(gemma3_text, 18 layers), float32, the owl trait vector (readout "last"), added and
subtracted, effect vs relative depth; plus the perception-vs-behaviour probe per layer.

Figures (steerdiff.layer_profile): per layer and direction the strength of the sweep's
grid with the largest owl-share shift whose KL <= kl_bound, re-scored on further questions
(disjoint from the ones that chose it): effect = steered - unsteered owl share per question,
mean and 95% CI over questions. The baseline measured in the same run: each model's unsteered
owl share (the `baseline` field) and, for the probe, the unsteered log-odds and a sanity
check that the model's classification read-out tells clearly positive from clearly negative
texts at all (`classification_check`).

  OMP_NUM_THREADS=1 python3 bench/bench_profile.py [--quick]

writes bench/results/profile[_quick].json/.png and perception[_quick].json/.png; finished
models are kept under bench/results/.cache/profile[_quick]/ so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from steerdiff import io
from steerdiff.layer_profile import (
    ProfileConfig,
    layer_profile,
    perception_figure,
    png,
    profile_figure,
)
from steerdiff.models import load_model
from steerdiff.perception_probe import (
    SENTIMENT_NEGATIVE,
    SENTIMENT_POSITIVE,
    log_odds,
    perception_items,
)

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["default", "gemma3-270m"]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def config(quick: bool) -> ProfileConfig:
    if quick:
        return ProfileConfig(
            layers="every:6",
            strengths=[-4.0, 4.0],
            n_questions=3,
            ci_questions=8,
            n_contrast=10,
            n_neutral=2,
            kl_tokens=6,
            perception=True,
        )
    return ProfileConfig(
        layers="every:2",
        strengths=[-8.0, -4.0, -2.0, 2.0, 4.0, 8.0],
        n_questions=5,
        ci_questions=30,
        perception=True,
    )


def classification_check(lm) -> dict:
    """Unsteered log-odds (positive vs negative) of the probe's classification read-out on
    clearly positive and clearly negative texts: the probe means something only if these
    differ."""
    pos = log_odds(lm, perception_items(lm, SENTIMENT_POSITIVE), None, "", 0.0)
    neg = log_odds(lm, perception_items(lm, SENTIMENT_NEGATIVE), None, "", 0.0)
    acc = (sum(x > 0 for x in pos) + sum(x < 0 for x in neg)) / (len(pos) + len(neg))
    return {
        "positive_mean": sum(pos) / len(pos),
        "negative_mean": sum(neg) / len(neg),
        "accuracy": acc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="3-4 layers, 2 strengths (< 4 min)")
    ap.add_argument(
        "--strengths",
        default=None,
        help="e.g. -1,-0.5,-0.25,0.25,0.5,1: the full profile at these strengths only, no "
        "perception probe (ranks layers that saturate at the default grid's smallest "
        "strength); writes profile_small.json/.png",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    suffix = "_quick" if args.quick else ("_small" if args.strengths else "")
    t0 = time.perf_counter()
    cfg = config(args.quick)
    if args.strengths:
        strengths = [float(s) for s in args.strengths.split(",")]
        cfg = cfg.model_copy(update={"strengths": strengths, "perception": False})
    lms = [load_model(m, dtype="float32") for m in MODELS]
    for lm in lms:
        say(f"model {lm.spec} dtype {lm.model.dtype}")
    res = layer_profile(lms, cfg, resume_dir=RESULTS / ".cache" / f"profile{suffix}")
    checks = {lm.spec: classification_check(lm) for lm in lms} if cfg.perception else {}
    wall = time.perf_counter() - t0

    # compute time per model (kept with a resumed model), and this run's wall time
    compute = {m.model: round(m.timings["profile_s"], 1) for m in res.models}
    data = res.to_dict() | {"wall_s": round(wall, 1), "compute_s": compute, "dtype": "float32"}
    for m in data["models"]:
        m.pop("perception", None)
    io.atomic_write_json(RESULTS / f"profile{suffix}.json", data)
    io.atomic_write_bytes(RESULTS / f"profile{suffix}.png", png(profile_figure(res)))
    if cfg.perception:
        write_perception(res, cfg, checks, wall, suffix)
    report(res, cfg, checks)
    print(f"\nwall {wall:.0f} s; wrote {RESULTS}/profile{suffix}.json/.png (and perception)")
    print(json.dumps(data["peaks"], indent=1))


def write_perception(res, cfg: ProfileConfig, checks: dict, wall: float, suffix: str) -> None:
    perc = {
        "config": {"coeff": cfg.perception_coeff, "dtype": "float32"},
        "models": [
            m.perception
            | {"model": m.model, "family": m.family, "classification_check": checks[m.model]}
            for m in res.models
        ],
        "wall_s": round(wall, 1),
    }
    io.atomic_write_json(RESULTS / f"perception{suffix}.json", perc)
    io.atomic_write_bytes(RESULTS / f"perception{suffix}.png", png(perception_figure(res)))


def report(res, cfg: ProfileConfig, checks: dict) -> None:
    """Print each model's peaks and per-layer rows (and the perception probe's, if run)."""
    for m in res.models:
        print(
            f"\n{m.model} ({m.family}, {m.n_layers} layers), float32; unsteered owl share "
            f"{m.baseline:.4f} on {cfg.ci_questions} questions"
        )
        for d in ("add", "subtract"):
            pk = m.peak[d]
            print(
                f"  {d:8s} peak layer {pk['layer']:2d} (relative depth {pk['depth']:.2f}) "
                f"strength {pk['strength']:+g}: effect {pk['effect']:+.4f} "
                f"[{pk['ci95'][0]:+.4f}, {pk['ci95'][1]:+.4f}]; log share "
                f"{pk['log_effect']:+.2f} [{pk['log_ci95'][0]:+.2f}, {pk['log_ci95'][1]:+.2f}]"
                f"{'' if pk['within_kl'] else ' (no layer within the KL bound)'}"
            )
            lg = pk["log"]
            print(
                f"  {d:8s} peak by log share: layer {lg['layer']:2d} (relative depth "
                f"{lg['depth']:.2f}) strength {lg['strength']:+g}: {lg['log_effect']:+.2f} "
                f"[{lg['log_ci95'][0]:+.2f}, {lg['log_ci95'][1]:+.2f}] nats"
            )
            for la, x, row in zip(m.layers, m.depth, getattr(m, d), strict=True):
                print(
                    f"    layer {la:2d} ({x:.2f}) s {row['strength']:+g} KL {row['kl']:.3f}"
                    f"{'' if row['within_kl'] else ' (over KL bound)'} effect "
                    f"{row['effect']:+.4f} [{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}]; "
                    f"log share {row['log_effect']:+.2f} "
                    f"[{row['log_ci95'][0]:+.2f}, {row['log_ci95'][1]:+.2f}]"
                )
        if not cfg.perception:
            continue
        p = m.perception
        c = checks[m.model]
        print(
            f"  perception vs behaviour (sentiment vector x +/-{p['coeff']:g}; log-odds nats); "
            f"classification check: clear positive {c['positive_mean']:+.2f}, clear negative "
            f"{c['negative_mean']:+.2f}, accuracy {c['accuracy']:.2f}"
        )
        for la, x, pe, be, dom in zip(
            p["layers"],
            p["relative_depth"],
            p["perception"],
            p["behaviour"],
            p["dominant"],
            strict=True,
        ):
            print(
                f"    layer {la:2d} ({x:.2f}) perception {pe['mean']:+.3f} "
                f"[{pe['ci95'][0]:+.3f}, {pe['ci95'][1]:+.3f}] (unsteered {pe['base']:+.2f})  "
                f"behaviour {be['mean']:+.3f} [{be['ci95'][0]:+.3f}, {be['ci95'][1]:+.3f}] "
                f"(unsteered {be['base']:+.2f})  -> {dom}"
            )


if __name__ == "__main__":
    main()
