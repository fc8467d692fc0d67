"""Claims 1 and 5: is a prompt's steering-vector approximability what predicts transfer?
And which fitted biases (q/k/v, residual, MLP input) close the loss gap and raise the trait?

Per animal (default: the first 8 candidates of data/animals.yaml, fixed in advance):
  base share      exact scorer (evals.exact_preference), 50 questions, no system prompt
  prompted share  the same with the trait system prompt (teachers' template)
  steered share   the best cell of a sweep (sweep.run_sweep, readout "last" contrast vector,
                  layers 3,9,15,21,27 x strengths 1,2,4,8 at hook_resid_post; best target rate
                  with off-target gain <= 0.10, no KL bound: the published protocol), re-scored
                  on 50 questions; also reported: the best cell under the literal "rate" rule
  approximability = steered share / prompted share (paired bootstrap CI over questions)
Per (animal, student kind): the prompted teacher writes numbers (tasks.numbers.make_dataset:
constrained decoding + format grammar, top-20 teacher log-probs stored); a student is fitted
with the FitConfig printed below (objective distill on the stored top-k, pinned); we report
the student's trait share, transfer = student - base (paired CI over questions), the CE and KL
gap closed on held-out rows (bootstrap CIs over rows, fit.losses).
Across animals: Spearman(approximability, transfer) per student kind, bootstrap CI over
animals (evals.stats.spearman_ci); scatter PNG (interpret.plots.scatter_ci_png).

Every unit is cached in --runs (resumable; two processes may share a runs folder if they
work on different units), and the JSON/PNG are rebuilt from everything in --runs at the end.

  python bench/bench_approx_transfer.py                       # the full run (see --help)
  python bench/bench_approx_transfer.py --quick               # smoke check, minutes
  python bench/bench_approx_transfer.py --report-only         # rebuild JSON + PNG from --runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from steerdiff.evals import (
    Steering,
    exact_preference,
    paired_difference,
    ratio_ci,
    spearman_ci,
)
from steerdiff.extract import trait_system_prompt
from steerdiff.io import atomic_write_json, read_json
from steerdiff.models import load_model

ANIMALS = "owl,cat,dog,lion,eagle,dolphin,wolf,elephant"
SINGLE_HOOK = "blocks.15.hook_resid_post"  # a middle layer of SmolLM2-135M's 30
# lr per kind: from bench/bench_gap.py (qkv, resid, mlp_in, lora); the single vector's 0.1 is
# set a priori from issue 18's norm argument (Adam moves each coordinate <= lr per step, and
# the teacher's contrast vectors have norm ~100 at 576 dims), not tuned on these results.
VECTOR_KINDS = {
    "single": dict(hooks=[SINGLE_HOOK], lr=0.1),
    "qkv": dict(hooks=["blocks.*.attn.hook_{q,k,v}"], lr=1e-2),
    "resid": dict(hooks=["blocks.*.hook_resid_post"], lr=1e-2),
    "mlp_in": dict(hooks=["blocks.*.ln2.hook_normalized"], lr=1e-3),
}
LORA_LR = 2e-3
KINDS = (*VECTOR_KINDS, "lora")


def fit_settings(args) -> dict:
    """Every FitConfig field the bench relies on, explicit (other helpers change defaults)."""
    return dict(
        objective="distill",
        optimizer="adam",
        betas=(0.9, 0.999),
        weight_decay=0.0,
        schedule="cosine",
        warmup_steps=2,
        init="zero",
        epochs=args.epochs,
        batch_size=16,
        val_size=max(8, args.rows // 4),
        eval_every=0,
        lr_units="absolute",  # the lrs here are absolute (the default is activation units)
        converge_tol=None,  # a fixed epoch budget (the default stops on convergence)
        seed=0,
        progress=False,
    )


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pref_dict(r) -> dict:
    return {
        "share": r.target_rate,
        "ci95": list(r.ci95),
        "n_questions": r.n_questions,
        "per_question": [q["target_rate"] for q in r.per_question],
        "top_other": list(r.off_target()),
    }


# ----------------------------------------------------------------------------- units

_BASES: dict[tuple[str, int], object] = {}


def base_result(lm, animal: str, n_questions: int):
    """The unsteered model's PreferenceResult (deterministic: computed once per process)."""
    key = (animal, n_questions)
    if key not in _BASES:
        _BASES[key] = exact_preference(lm, animal, n_questions=n_questions)
    return _BASES[key]


def cheap_unit(lm, animal: str, args, runs: Path) -> dict:
    """Base, prompted and best-steered shares of one animal, and approximability."""
    path = runs / animal / "cheap.json"
    if path.exists():
        return read_json(path)
    from steerdiff.sweep import SweepConfig, best_cell, run_sweep

    t0, c0 = time.time(), time.process_time()
    nq = args.n_questions
    base = base_result(lm, animal, nq)
    prompted = exact_preference(
        lm, animal, n_questions=nq, system_prompt=trait_system_prompt(animal, "animal")
    )
    cfg = SweepConfig(
        target=animal,
        layers=args.layers,
        strengths=args.strengths,
        readouts=["last"],
        n_questions=5,
        confirm_questions=0,
        off_target_bound=0.10,
        off_target_rule="gain",
        kl_bound=None,
    )
    sw = run_sweep(lm, cfg, progress=False)
    best = sw.best
    rate_rule = best_cell(sw.cells, 0.10, None, "rate")
    out: dict = {
        "animal": animal,
        "base": pref_dict(base),
        "prompted": pref_dict(prompted),
        "sweep": {
            "config": {k: v for k, v in cfg.__dict__.items()},
            "best": best.__dict__ if best else None,
            "best_rate_rule": rate_rule.__dict__ if rate_rule else None,
            "cells": [c.__dict__ for c in sw.cells],
        },
    }
    if best is None:
        steered_share = base
        out["steered"] = {**pref_dict(base), "note": "no cell within the off-target bound"}
    else:
        vec = sw.vectors["last"][best.hook]
        steering = Steering({best.hook: vec}, best.strength, "all")
        steered_share = exact_preference(lm, animal, n_questions=nq, steering=steering)
        out["steered"] = pref_dict(steered_share)
    a, ci = ratio_ci(
        [q["target_rate"] for q in steered_share.per_question],
        [q["target_rate"] for q in prompted.per_question],
    )
    out["approximability"] = {"value": a, "ci95": list(ci)}
    out["seconds"], out["cpu_s"] = time.time() - t0, time.process_time() - c0
    atomic_write_json(path, out)
    return out


def dataset_unit(lm, animal: str, args, runs: Path) -> Path:
    from steerdiff.tasks.numbers import make_dataset
    from steerdiff.teachers import build_teacher

    path = runs / animal / "numbers.jsonl"
    if Path(str(path)[: -len(".jsonl")] + ".manifest.json").exists():
        return path
    t0 = time.time()
    teacher = build_teacher({"kind": "prompt", "animal": animal}, lm)
    m = make_dataset(
        teacher,
        str(path),
        n_prompts=2 * args.rows,
        target_valid=args.rows,
        topk=20,
        max_new_tokens=48,
        batch_size=32,
        seed=0,
        probe=0,
    )
    log(f"{animal}: dataset {m.get('n_valid')} rows in {time.time() - t0:.0f}s")
    return path


def student_unit(lm, animal: str, kind: str, args, runs: Path) -> dict:
    """Fit one student on the animal's numbers; its trait share and gap closed."""
    from steerdiff.fit import FitConfig, LoraConfig, fit, fit_lora, lora_context

    out_dir = runs / animal / kind
    path = out_dir / "student.json"
    if path.exists():
        return read_json(path)
    data = dataset_unit(lm, animal, args, runs)
    t0, c0 = time.time(), time.process_time()
    settings = fit_settings(args)
    if kind == "lora":
        cfg = FitConfig(**settings, lr=LORA_LR)
        lora = LoraConfig(r=8, alpha=8)
        res = fit_lora(lm, data, cfg, lora, out_dir=out_dir)
        with lora_context(lm, lora, res.state):
            r = exact_preference(lm, animal, n_questions=args.n_questions)
    else:
        cfg = FitConfig(**settings, **VECTOR_KINDS[kind])
        res = fit(lm, data, cfg, out_dir=out_dir)
        r = exact_preference(
            lm, animal, n_questions=args.n_questions, steering=Steering(res.vectors)
        )
    fit_s = time.time() - t0
    diff, dci = paired_difference(r, base_result(lm, animal, args.n_questions))
    summ = {k: (list(v) if isinstance(v, tuple) else v) for k, v in res.summary().items()}
    out = {
        "animal": animal,
        "kind": kind,
        "fit_config": cfg.model_dump(mode="json"),
        "fit": summ,
        "student": pref_dict(r),
        "transfer": {"value": diff, "ci95": list(dci)},
        "fit_s": fit_s,
        "seconds": time.time() - t0,
        "cpu_s": time.process_time() - c0,
    }
    if res.vectors is not None:
        out["vector_norms"] = {
            "mean": float(torch.stack([v.norm() for v in res.vectors.values()]).mean())
        }
    atomic_write_json(path, out)
    return out


# ----------------------------------------------------------------------------- report


def collect(runs: Path) -> dict:
    animals: dict[str, dict] = {}
    for cheap in sorted(runs.glob("*/cheap.json")):
        c = read_json(cheap)
        c["students"] = {}
        for sj in sorted(cheap.parent.glob("*/student.json")):
            s = read_json(sj)
            c["students"][s["kind"]] = s
        animals[c["animal"]] = c
    return animals


def kl_bounded(a: dict, kl_bound: float = 0.5) -> dict | None:
    """Sensitivity: the best cell with off-target gain <= 0.10 AND KL <= kl_bound (the
    sweep's own default), from the saved cells (5-question rates), over the prompted share."""
    from steerdiff.sweep import Cell, best_cell

    cell = best_cell([Cell(**c) for c in a["sweep"]["cells"]], 0.10, kl_bound, "gain")
    if cell is None:
        return None
    return {
        "cell": f"L{cell.layer}x{cell.strength:g}",
        "steered_share_5q": cell.target_rate,
        "kl": cell.kl,
        "approximability_5q": cell.target_rate / a["prompted"]["share"],
    }


def summarise(animals: dict[str, dict]) -> dict:
    for a in animals.values():
        a["approximability_kl_bounded"] = kl_bounded(a)
        # the brief's ratio counts the unsteered share in both; this one is the fraction of
        # the prompt's rise over base that the vector reproduces (paired over questions)
        b = a["base"]["per_question"]
        num = [s - x for s, x in zip(a["steered"]["per_question"], b, strict=True)]
        den = [p - x for p, x in zip(a["prompted"]["per_question"], b, strict=True)]
        v, c = ratio_ci(num, den)
        a["approximability_effect"] = {"value": v, "ci95": list(c)}
    corr = {}
    for kind in KINDS:
        pts = [
            (a["approximability"]["value"], a["students"][kind]["transfer"]["value"])
            for a in animals.values()
            if kind in a["students"]
        ]
        if len(pts) >= 3:
            x, y = zip(*pts, strict=True)
            corr[kind] = spearman_ci(x, y, n_boot=2000, seed=0).to_dict()
        else:
            corr[kind] = {"n": len(pts), "note": "fewer than 3 animals: no correlation"}
    gap = {}
    for kind in KINDS:
        rows = [a["students"][kind] for a in animals.values() if kind in a["students"]]
        if rows:
            gap[kind] = [
                {
                    "animal": s["animal"],
                    "ce_gap_closed": s["fit"].get("gap_closed"),
                    "ce_gap_closed_ci": s["fit"].get("gap_closed_ci"),
                    "kl_gap_closed": s["fit"].get("kl_gap_closed"),
                    "kl_gap_closed_ci": s["fit"].get("kl_gap_closed_ci"),
                    "ce_gap_nats": s["fit"].get("ce_gap"),
                    "kl_gap_nats": s["fit"].get("kl_gap"),
                    "n_val_rows": s["fit"].get("n_val_rows"),
                    "trait_share": s["student"]["share"],
                    "trait_ci95": s["student"]["ci95"],
                    "transfer": s["transfer"]["value"],
                    "transfer_ci95": s["transfer"]["ci95"],
                }
                for s in rows
            ]
    return {"spearman_approximability_vs_transfer": corr, "claim5_by_kind": gap}


def print_tables(animals: dict[str, dict], summary: dict) -> None:
    print("\nclaim 1: per animal (exact scorer, float32, shares with 95% CI over questions)")
    print(
        f"{'animal':9} {'base':>6} {'prompted':>18} {'steered(best)':>18} {'cell':>10} "
        f"{'approx':>18}"
    )
    for a in animals.values():
        b = a["sweep"]["best"]
        cell = f"L{b['layer']}x{b['strength']:g}" if b else "none"
        print(
            f"{a['animal']:9} {a['base']['share']:6.3f} {fmt(a['prompted'])} {fmt(a['steered'])} "
            f"{cell:>10} {a['approximability']['value']:6.2f} "
            f"[{a['approximability']['ci95'][0]:.2f},{a['approximability']['ci95'][1]:.2f}] "
            f"KL {b['kl'] if b else float('nan'):.2f} effect-ratio "
            f"{a['approximability_effect']['value']:.2f} [{a['approximability_effect']['ci95'][0]:.2f},"
            f"{a['approximability_effect']['ci95'][1]:.2f}]"
        )
    print("\nsensitivity: best cell with off-target gain <= 0.10 and KL <= 0.5 (5 questions)")
    for a in animals.values():
        k = a["approximability_kl_bounded"]
        print(
            f"{a['animal']:9} "
            + (
                f"{k['cell']:>8} steered {k['steered_share_5q']:.3f} KL {k['kl']:.2f} "
                f"approx {k['approximability_5q']:.2f}"
                if k
                else "no cell"
            )
        )
    print("\nstudents: share, transfer (student - base, paired CI), CE / KL gap closed")
    for a in animals.values():
        for kind, s in a["students"].items():
            f, t = s["fit"], s["transfer"]
            print(
                f"{a['animal']:9} {kind:7} {fmt(s['student'])} transfer {t['value']:+.4f} "
                f"[{t['ci95'][0]:+.4f},{t['ci95'][1]:+.4f}] CE-gap {num(f.get('gap_closed'))} "
                f"{ci(f.get('gap_closed_ci'))} KL-gap {num(f.get('kl_gap_closed'))} "
                f"{ci(f.get('kl_gap_closed_ci'))} ({s['fit_s']:.0f}s)"
            )
    print("\nSpearman(approximability, transfer) per student kind, bootstrap 95% CI over animals")
    for kind, c in summary["spearman_approximability_vs_transfer"].items():
        if "rho" in c:
            print(
                f"  {kind:7} rho {c['rho']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] "
                f"n={c['n']}"
            )
        else:
            print(f"  {kind:7} {c['note']} (n={c['n']})")


def fmt(p: dict) -> str:
    return f"{p['share']:6.3f} [{p['ci95'][0]:.3f},{p['ci95'][1]:.3f}]"


def num(v) -> str:
    return "   n/a" if v is None else f"{v:+.2f}"


def ci(v) -> str:
    return "" if not v else f"[{v[0]:+.2f},{v[1]:+.2f}]"


def plot(animals: dict[str, dict], summary: dict, path: Path) -> None:
    from steerdiff.interpret.plots import scatter_ci_png

    pts = []
    for a in animals.values():
        for kind, s in a["students"].items():
            if kind in ("resid", "mlp_in"):
                continue
            pts.append(
                {
                    "x": a["approximability"]["value"],
                    "x_ci": a["approximability"]["ci95"],
                    "y": s["transfer"]["value"],
                    "y_ci": s["transfer"]["ci95"],
                    "label": a["animal"],
                    "group": kind,
                }
            )
    if not pts:
        return
    corr = summary["spearman_approximability_vs_transfer"]
    title = "; ".join(
        f"{k} rho {c['rho']:+.2f} [{c['ci95'][0]:+.2f},{c['ci95'][1]:+.2f}] n={c['n']}"
        for k, c in corr.items()
        if "rho" in c
    )
    scatter_ci_png(
        pts,
        path,
        "approximability (best steered share / prompted share)",
        "transfer (student share - base share, exact scorer)",
        title or "approximability vs transfer",
    )


def report(args, runs: Path, wall: float) -> None:
    animals = collect(runs)
    summary = summarise(animals)
    print_tables(animals, summary)
    out = Path(args.out)
    png = out.with_suffix(".png")
    plot(animals, summary, png)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    doc = {
        "bench": "bench_approx_transfer",
        "command": " ".join(sys.argv),
        "commit": commit,
        "dtype": "float32",
        "model": "embedded SmolLM2-135M-Instruct",
        "machine": "2-core CPU shared by 5 jobs",
        "settings": {
            "animals": list(animals),
            "rows_per_teacher": args.rows,
            "n_questions": args.n_questions,
            "layers": args.layers,
            "strengths": args.strengths,
            "fit": fit_settings(args),
            "lr": {**{k: v["lr"] for k, v in VECTOR_KINDS.items()}, "lora": LORA_LR},
            "hooks": {k: v["hooks"] for k, v in VECTOR_KINDS.items()},
        },
        "summary": summary,
        "animals": {
            k: {**v, "sweep": {**v["sweep"], "cells": v["sweep"]["cells"]}}
            for k, v in animals.items()
        },
        "wall_s_this_process": wall,
        "compute_s_all_units": sum(
            a.get("seconds", 0) + sum(s["seconds"] for s in a["students"].values())
            for a in animals.values()
        ),
    }
    atomic_write_json(out, doc)
    print(f"\nwrote {out}" + (f" and {png}" if png.exists() else ""), flush=True)


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 animals, tiny sizes (smoke check)")
    ap.add_argument("--animals", default=ANIMALS, help="the approximability part (cheap)")
    ap.add_argument("--student-animals", default=None, help="default: --animals")
    ap.add_argument("--kinds", default="single", help=f"student kinds, from {KINDS}")
    ap.add_argument("--rows", type=int, default=96, help="valid teacher rows per animal")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--n-questions", type=int, default=50)
    ap.add_argument("--layers", default="3,9,15,21,27")
    ap.add_argument("--strengths", default="1,2,4,8")
    ap.add_argument("--runs", default=None, help="cache folder (default runs/approx_transfer)")
    ap.add_argument("--out", default=None, help="default bench/results/approx_transfer.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    suffix = "_quick" if args.quick else ""
    if args.quick:
        args.animals, args.rows, args.epochs, args.n_questions = "owl,cat", 24, 1, 5
        args.layers, args.strengths = "15,27", "2,8"
    args.runs = Path(args.runs or f"runs/approx_transfer{suffix}")
    args.out = args.out or f"bench/results/approx_transfer{suffix}.json"
    args.layers = [int(x) for x in args.layers.split(",")]
    args.strengths = [float(x) for x in args.strengths.split(",")]
    args.animals = args.animals.split(",")
    args.student_animals = (
        args.student_animals.split(",") if args.student_animals else list(args.animals)
    )
    args.kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in args.kinds if k not in KINDS]
    if bad:
        ap.error(f"--kinds {bad} unknown; use some of {KINDS}")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if not args.report_only:
        lm = load_model(dtype="float32")
        print("fit settings (pinned):", json.dumps(fit_settings(args)), flush=True)
        print("per kind:", json.dumps(VECTOR_KINDS), "lora lr", LORA_LR, flush=True)
        for animal in args.animals:
            c = cheap_unit(lm, animal, args, args.runs)
            log(
                f"{animal}: base {c['base']['share']:.3f} prompted {c['prompted']['share']:.3f} "
                f"steered {c['steered']['share']:.3f} approx {c['approximability']['value']:.2f}"
            )
        for animal in args.student_animals:
            cheap_unit(lm, animal, args, args.runs)
            for kind in args.kinds:
                s = student_unit(lm, animal, kind, args, args.runs)
                log(
                    f"{animal} {kind}: share {s['student']['share']:.4f} transfer "
                    f"{s['transfer']['value']:+.4f} KL-gap {num(s['fit'].get('kl_gap_closed'))} "
                    f"({s['seconds']:.0f}s)"
                )
    report(args, args.runs, time.time() - t0)


if __name__ == "__main__":
    main()
