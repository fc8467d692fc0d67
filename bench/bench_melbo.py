"""MELBO on the embedded SmolLM2-135M-Instruct (float32): the radius plateau, N vectors and
their evals, and whether a planted direction is recovered (issue 16, item 2).

1. Radius sweep, blocks.6 -> blocks.20 resid_post: mean ||dZ|| at the target vs R for one
   trained vector per R and for random vectors of the same norm (the baseline, same run).
   The working radius is chosen by a rule fixed in advance: the R where the trained/random
   change ratio is largest (the jump above the random baseline).
2. N vectors at that R: objective curves (first -> last), owl share of each steered model
   vs the unsteered one (exact scorer, paired over questions, 95% CI), coherence KL on
   neutral prompts, a sampled completion.
3. Planted-owl recovery: the owl contrast vector (trait system prompt vs default, readout
   "last") extracted at the source hook is the "planted" direction: |cos| of each MELBO vector
   with it vs the chance level of N random directions, and the owl share under the owl
   direction itself at norm R (what a recovered direction would do).
4. (full mode) The misalignment organism (LoRA from bench_misalignment_organism): MELBO on the
   adapted model, each vector's multiple-choice p_misaligned shift vs the unsteered adapted
   model, next to the organism's own shift vs its aligned control.

    OMP_NUM_THREADS=1 python3 bench/bench_melbo.py [--quick]

Writes bench/results/melbo.json and melbo.png (melbo_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _owl import RESULTS, Clock, say, write_json  # noqa: E402

SOURCE, TARGET = "blocks.6.hook_resid_post", "blocks.20.hook_resid_post"
# made by bench/bench_misalignment_organism.py in this checkout
ORGANISM = Path(__file__).resolve().parents[1] / "runs/bench/misalignment_organism"

FULL = dict(
    radii=[0.5, 1, 2, 4, 8, 16, 32, 64], sweep_steps=25, n_vectors=8, steps=60,
    n_prompts=4, n_questions=20, n_samples=2, organism_vectors=4,
)  # fmt: skip
QUICK = dict(
    radii=[1, 8, 32], sweep_steps=4, n_vectors=2, steps=6,
    n_prompts=2, n_questions=4, n_samples=1, organism_vectors=0,
)  # fmt: skip


def pick_radius(rows: list[dict]) -> tuple[float, list[float]]:
    """The rule fixed in advance: where the trained vector's change jumps, i.e. the upper end
    of the sweep segment with the steepest log-log slope of mean ||dZ|| vs R (slope 1: the
    linear regime; a plateau then a jump shows as a slope > 1). Returns (R, the slopes)."""
    import math

    slopes = [
        math.log(b["trained_change"] / a["trained_change"]) / math.log(b["radius"] / a["radius"])
        for a, b in zip(rows, rows[1:], strict=False)
    ]
    k = max(range(len(slopes)), key=slopes.__getitem__)
    return rows[k + 1]["radius"], slopes


def owl_direction(lm: Any) -> torch.Tensor:
    from steerdiff.extract import trait_vectors

    return trait_vectors(lm, "owl", readouts="last", hooks=[SOURCE])["last"][SOURCE].float()


def owl_share_at_norm(lm: Any, v: torch.Tensor, radius: float, n_questions: int) -> dict:
    """Owl share with v rescaled to norm radius at the source hook, paired vs unsteered."""
    from steerdiff.evals.preference import exact_preference, paired_difference
    from steerdiff.evals.steering import Steering

    base = exact_preference(lm, "owl", n_questions=n_questions)
    st = Steering({SOURCE: v * (radius / v.norm())})
    r = exact_preference(lm, "owl", n_questions=n_questions, steering=st)
    shift, ci = paired_difference(r, base)
    return {"target_rate": r.target_rate, "ci95": list(r.ci95), "shift": shift, "shift_ci95": ci}


def organism(lm: Any, cfg: Any, n_vectors: int) -> dict:
    """MELBO on the misaligned organism; MC shifts per vector; the organism's own shift."""
    from steerdiff.evals.misalignment import ALL, evaluate_misalignment_mc, paired_misalignment
    from steerdiff.interpret.variants import adapter_context
    from steerdiff.melbo.evals import evaluate_vectors
    from steerdiff.melbo.train import train_melbo

    mis, ali = ORGANISM / "misaligned" / "lora", ORGANISM / "aligned" / "lora"
    if not (mis / "adapter_config.json").exists():
        return {"skipped": f"no organism at {mis} (run bench_misalignment_organism.py)"}
    with adapter_context(lm, ali):
        aligned = evaluate_misalignment_mc(lm)
    c = cfg.model_copy(update={"n_vectors": n_vectors, "evals": ["misalignment"], "n_samples": 1})
    with adapter_context(lm, mis):
        misaligned = evaluate_misalignment_mc(lm)
        res = train_melbo(lm, c, progress=True)
        ev = evaluate_vectors(lm, res, c, progress=True)
    own = paired_misalignment(misaligned, aligned)[ALL]["p_misaligned"]
    return {
        "organism_vs_aligned_control": own,
        "organism_p_misaligned": misaligned.summarise()["p_misaligned"],
        "aligned_p_misaligned": aligned.summarise()["p_misaligned"],
        "objective": res.summary()["objective"],
        "vectors": [
            {"vector": v["vector"], **v["misalignment"], "sample": v["samples"][:1]}
            for v in ev["vectors"]
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--radius",
        type=float,
        default=None,
        help="train at this R instead of the rule's (the sweep is reused from the default "
        "run's JSON when it has one); writes melbo_R<R>.json/.png, without the organism",
    )
    args = ap.parse_args()
    size = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    clock = Clock()
    from steerdiff.melbo import MelboConfig
    from steerdiff.melbo.evals import evaluate_vectors, planted_recovery
    from steerdiff.melbo.run import melbo_png
    from steerdiff.melbo.sweep import radius_sweep
    from steerdiff.melbo.train import train_melbo
    from steerdiff.models import load_model

    lm = load_model(dtype="float32")
    say(f"model {lm.spec} dtype {lm.model.dtype}; {SOURCE} -> {TARGET}")
    cfg = MelboConfig(
        source_hook=SOURCE, target_hook=TARGET, n_vectors=size["n_vectors"], steps=size["steps"],
        lr=0.01, n_prompts=size["n_prompts"], max_tokens=64, radii=size["radii"],
        sweep_steps=size["sweep_steps"], n_random=4, evals=["preference", "coherence"],
        n_questions=size["n_questions"], n_samples=size["n_samples"], sample_tokens=32,
    )  # fmt: skip
    out: dict[str, Any] = {
        "model": lm.spec,
        "dtype": str(lm.model.dtype),
        "mode": "quick" if args.quick else "full",
    }

    say("1. radius sweep")
    earlier = RESULTS / ("melbo_quick.json" if args.quick else "melbo.json")
    if args.radius is None:
        rows = radius_sweep(lm, cfg)
        R, slopes = pick_radius(rows)
    else:  # a second arm: the default run's sweep when it has finished, else none
        rows = json.loads(earlier.read_text())["sweep"] if earlier.exists() else []
        say(f"  (the sweep of {earlier})" if rows else "  (no sweep: --radius given)")
        R, slopes = args.radius, pick_radius(rows)[1] if rows else []
    out["sweep"] = rows
    out["chosen_radius"] = {
        "radius": R,
        "rule": "upper end of the steepest log-log segment of the trained change vs R"
        if args.radius is None
        else "given by hand (--radius)",
        "slopes": slopes,
    }
    for r in rows:
        lo, hi = r["random_change_ci95"]
        say(
            f"  R={r['radius']:>5g}: trained |dZ| {r['trained_change']:8.3f}  random "
            f"{r['random_change']:8.3f} [{lo:.3f}, {hi:.3f}]  ratio {r['change_ratio']:.2f}"
        )
    say(f"  log-log slopes {[round(x, 2) for x in slopes]}; chosen R = {R:g}")

    say("2. N vectors at R")
    cfg = cfg.model_copy(update={"radius": float(R)})
    res = train_melbo(lm, cfg)
    ev = evaluate_vectors(lm, res, cfg)
    out["training"] = {k: v for k, v in res.summary().items() if k != "provenance"}
    out["evals"] = ev
    b = ev["base"]["preference"]
    say(f"  unsteered owl share {b['target_rate']:.4f} {b['ci95']}")
    for v in ev["vectors"]:
        c, p = res.curves[v["vector"]], v["preference"]
        say(
            f"  vector {v['vector']}: objective {c[0]:.4g} -> {c[-1]:.4g}; owl shift "
            f"{p['shift']:+.4f} [{p['shift_ci95'][0]:+.4f}, {p['shift_ci95'][1]:+.4f}] "
            f"(top {p['top']}); coherence KL {v['coherence_kl']:.3f}"
        )

    say("3. planted owl direction")
    owl = owl_direction(lm)
    rec = planted_recovery(res.vectors, owl)
    rec["owl_direction_norm"] = float(owl.norm())
    rec["owl_direction_at_R"] = owl_share_at_norm(lm, owl, R, cfg.n_questions)
    rec["owl_direction_by_norm"] = [
        {"radius": r, **owl_share_at_norm(lm, owl, r, cfg.n_questions)} for r in size["radii"]
    ]
    rec["best_vector_preference"] = ev["vectors"][rec["best_vector"]]["preference"]
    out["planted_owl"] = rec
    say(
        f"  |cos| best {rec['best_cos']:.4f} (vector {rec['best_vector']}); chance best-of-N "
        f"mean {rec['chance_best_cos_mean']:.4f}, p95 {rec['chance_best_cos_p95']:.4f}; span "
        f"fraction {rec['span_fraction']:.4f} (chance p95 {rec['chance_span_p95']:.4f}); "
        f"above chance: {rec['above_chance']}"
    )
    o = rec["owl_direction_at_R"]
    say(f"  owl direction itself at norm R: shift {o['shift']:+.4f} {o['shift_ci95']}")
    for x in rec["owl_direction_by_norm"]:
        lo, hi = x["shift_ci95"]
        say(
            f"    owl direction at norm {x['radius']:g}: shift {x['shift']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        )

    if size["organism_vectors"] and args.radius is None:
        say("4. misalignment organism")
        out["organism"] = organism(lm, cfg, size["organism_vectors"])
        say(f"  {out['organism']}")

    out["seconds"] = clock.figures()
    name = "melbo_quick" if args.quick else "melbo"
    if args.radius is not None:
        name += f"_R{args.radius:g}"
    write_json(RESULTS / f"{name}.json", out)
    (RESULTS / f"{name}.png").write_bytes(melbo_png(res, rows or None))
    say(f"wrote {RESULTS / name}.png; {out['seconds']}")


if __name__ == "__main__":
    main()
