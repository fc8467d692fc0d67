"""Activation fuzzing on pairs with a known answer (issue 16, item 3).

The embedded SmolLM2-135M-Instruct in float32; isotropic noise (relative to each token's RMS)
at blocks.{6,12,18}.hook_resid_post (20/40/60% of the depth), scales 0, 0.1, 0.2, 0.4, 2 seeds, 20 questions (--quick: 0 and 0.2, 1 seed, 4); each question
scored alone under its own seeded draw (steerdiff.fuzz).

    (a) base vs the owl-steered teacher (base + 2.0 x the owl vector at blocks.24): owl share
        (exact scorer). Known answer: B (the teacher) holds more owl.
    (b) base vs a vector student of the demo (its fitted vectors at blocks.24, coeff 1.0):
        owl share. Known answer: B, as far as the student learnt the trait.
    (c) the narrow-misalignment organism: misaligned LoRA vs its aligned control, and vs
        base: P(misaligned) (multiple choice). Known answer: A (the misaligned LoRA).

Verdict: A - B of the eval averaged over the scales > 0, per question, bootstrap 95% CI over
questions. The baseline measured in the same run: the same paired difference at scale 0 (no
noise: the plain eval), and whether fuzzing gives the verdict the plain eval gives.

    OMP_NUM_THREADS=1 python3 bench/bench_fuzz.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _owl  # noqa: E402

from steerdiff.fuzz import FuzzConfig, resolve_variant, run_fuzz  # noqa: E402
from steerdiff.io import atomic_write_bytes, atomic_write_json, provenance  # noqa: E402
from steerdiff.models import load_model  # noqa: E402
from steerdiff.report.fuzz import draw_comparison  # noqa: E402

MAIN = Path(__file__).resolve().parents[1]  # the checkout (runs/ lives here)
STUDENT_GLOB = "runs/demo-sae/fit-vector-at-steered-hook-s0-*/vectors.safetensors"
ORGANISM = "runs/bench/misalignment_organism"
CACHE = _owl.CACHE / "fuzz"
KNOWN = {"base vs owl teacher": "B", "base vs vector student": "B"}
KNOWN |= {"misaligned vs aligned LoRA": "A", "misaligned LoRA vs base": "A"}


def copy_inputs(lm) -> dict[str, Path]:
    """The inputs, copied into the bench cache (the originals are read-only)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    _owl.owl_vector(lm)  # the owl vector (made once, cached by _owl)
    out = {"owl": _owl.CACHE / "owl_vector.safetensors", "student": CACHE / "student.safetensors"}
    if not out["student"].exists():
        found = sorted(MAIN.glob(STUDENT_GLOB)) + sorted(Path.cwd().glob(STUDENT_GLOB))
        if not found:
            sys.exit(f"no demo vector student ({STUDENT_GLOB}): run the demo experiment first")
        shutil.copy(found[0], out["student"])
        _owl.say(f"student vectors from {found[0]}")
    for side in ("misaligned", "aligned"):
        dst = CACHE / f"{side}_lora"
        if not (dst / "adapter_config.json").exists():
            src = next(p for p in (MAIN / ORGANISM, Path.cwd() / ORGANISM) if p.exists())
            dst.mkdir(exist_ok=True)
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy(src / side / "lora" / f, dst / f)
        out[side] = dst
    return out


def summary_line(name: str, c: dict) -> str:
    lv, z = c["level"], c["at_zero"]
    ok = "matches" if c["verdict"] == KNOWN[name] else "does NOT match"
    return (
        f"{name}: verdict {c['verdict']} ({ok} the known answer {KNOWN[name]}); A - B under "
        f"noise {lv['mean']:+.4f} [{lv['ci95'][0]:+.4f}, {lv['ci95'][1]:+.4f}]; baseline at "
        f"scale 0 {z['mean']:+.4f} [{z['ci95'][0]:+.4f}, {z['ci95'][1]:+.4f}]; rise verdict "
        f"{c['rise_verdict']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    clock = _owl.Clock()
    lm = load_model(dtype="float32")
    files = copy_inputs(lm)
    if args.quick:
        common = {"scales": [0.0, 0.2], "seeds": 1, "n_questions": 4}
    else:
        common = {"scales": [0.0, 0.1, 0.2, 0.4], "seeds": 2, "n_questions": 20}
    pref = FuzzConfig(eval="preference", target="owl", **common, layers=[6, 12, 18])
    mis = FuzzConfig(eval="misalignment", **common, layers=[6, 12, 18])
    v = {
        "base": resolve_variant(lm, "base"),
        "owl teacher": resolve_variant(lm, f"{files['owl']}@2.0"),
        "vector student": resolve_variant(lm, f"{files['student']}@1.0"),
    }
    work = CACHE / ("quick" if args.quick else "full")
    pairs = [("base", "owl teacher"), ("base", "vector student")]
    r_pref = run_fuzz(lm, v, pairs, pref, work / "preference")
    _owl.say(f"preference done {clock.figures()}")
    v2 = {
        "misaligned LoRA": resolve_variant(lm, str(files["misaligned"])),
        "aligned LoRA": resolve_variant(lm, str(files["aligned"])),
        "base": resolve_variant(lm, "base"),
    }
    pairs2 = [("misaligned LoRA", "aligned LoRA"), ("misaligned LoRA", "base")]
    r_mis = run_fuzz(lm, v2, pairs2, mis, work / "misalignment")
    names = [*KNOWN]
    comps = r_pref["comparisons"] + r_mis["comparisons"]
    lines = [summary_line(n, c) for n, c in zip(names, comps, strict=True)]
    for line in lines:
        print(line)
    for res in (r_pref, r_mis):
        for k, c in res["curves"].items():
            pts = ", ".join(f"{p['scale']:g}: {p['mean']:.4f} [{p['ci95'][0]:.4f}, "
                            f"{p['ci95'][1]:.4f}]" for p in c["points"])  # fmt: skip
            print(f"  {res['eval']['name']} {k}: {pts}")
    figures = clock.figures()
    print(f"model {lm.spec} float32, wall {figures['wall_s']} s, cpu {figures['cpu_s']} s")
    out = {
        "quick": args.quick,
        "dtype": "float32",
        "known_answers": KNOWN,
        "summary": lines,
        "matches": {n: c["verdict"] == KNOWN[n] for n, c in zip(names, comps, strict=True)},
        "preference": r_pref,
        "misalignment": r_mis,
        "time": figures,
        "provenance": provenance(lm, {"preference": pref, "misalignment": mis}, seed=0),
    }
    stem = "fuzz_quick" if args.quick else "fuzz"
    atomic_write_json(_owl.RESULTS / f"{stem}.json", json.loads(json.dumps(out, default=str)))
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.2))
    for ax, (res, c), n in zip(
        axes, [(r_pref, c) for c in r_pref["comparisons"]] + [(r_mis, c) for c in r_mis["comparisons"]],
        names, strict=True,
    ):  # fmt: skip
        draw_comparison(ax, res, c)
        ax.set_title(f"{n}: verdict {c['verdict']} (known {KNOWN[n]})", fontsize=9)
    fig.suptitle("SmolLM2-135M-Instruct float32: isotropic noise at blocks.6/12/18; 95% CIs")
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(_owl.RESULTS / f"{stem}.png", buf.getvalue())
    _owl.say(f"wrote {_owl.RESULTS / stem}.json/.png in {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
