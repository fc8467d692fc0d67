"""Claim 2: does a finetuned student learn to align with the teacher's steering vector?

Blank et al. 2026 (arXiv 2606.00995) measure, over finetuning, the cosine between the
student's induced activation shift (student minus base) and the teacher's vector.

Teacher: the demo's steered teacher (bench/_owl.py: SmolLM2-135M + 2.0 x the owl contrast
vector at blocks.24.hook_resid_post), 320 constrained number prompts. Student: LoRA r =
alpha = 8 on q,k,v,o,gate,up,down (the paper's setting), SFT on the completions, Adam.
Every `--every` steps fit.alignment.AlignmentLogger measures the student's mean activation
shift at blocks.24.hook_resid_post over 32 held-out number prompts (all positions) and its
cosine with v* (and |shift| / |v*|). Null: the cosine of a random direction with v* has
standard deviation 1/sqrt(576) = 0.042. The owl share (exact scorer, 50 questions) of
base, teacher and the final student is measured in the same run.

Usage: python bench/bench_alignment.py [--quick] [--out bench/results/alignment.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _owl  # noqa: E402
from _owl import COEFF, HOOK, Clock, say  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke check)")
    ap.add_argument("--out", default=str(_owl.RESULTS / "alignment.json"))
    ap.add_argument("--n-prompts", type=int, default=320)
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--probe", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.n_prompts, args.questions, args.epochs, args.probe = 32, 5, 1, 8
    clock = Clock()
    lm = _owl.load()
    v_star = COEFF * _owl.owl_vector(lm)
    data = _owl.teacher_data(lm, args.n_prompts)
    base = _owl.owl_share(lm, args.questions)
    teacher = _owl.owl_share(lm, args.questions, {HOOK: v_star})
    probe = _owl.probe_prompts(lm, args.probe)
    cfg = _owl.pinned(objective="sft", optimizer="adam", lr=args.lr, epochs=args.epochs)
    say(f"base {_owl.strip(base)}; teacher {_owl.strip(teacher)}")
    run = _owl.lora_student(lm, data, cfg, v_star, probe, args.questions, base, every=args.every)
    out = {
        "claim": "2: the student aligns with the teacher's steering vector during finetuning",
        "model": "embedded SmolLM2-135M-Instruct",
        "dtype": str(lm.model.dtype),
        "teacher": {"kind": "steered", "animal": "owl", "hook": HOOK, "coeff": COEFF},
        "v_star_norm": float(v_star.norm()),
        "data": {"file": data.name, "n_prompts": args.n_prompts},
        "probe": {"n_prompts": args.probe, "positions": "all", "hook": HOOK},
        "null_cos_sd": 1 / float(v_star.numel()) ** 0.5,
        "n_questions": args.questions,
        "config": _owl.describe(cfg),
        "lora": {"r": 8, "alpha": 8, "targets": "q,k,v,o,gate,up,down"},
        "base": base,
        "teacher_share": teacher,
        "student": run,
    }
    out.update(clock.figures())
    _owl.write_json(args.out, out)
    if "error" not in run:
        from steerdiff.interpret.plots import alignment_png

        png = Path(args.out).with_suffix(".png")
        title = f"LoRA student (Adam lr {args.lr}) of the owl-steered teacher, {HOOK}"
        alignment_png({"LoRA, Adam": run["alignment"]}, png, title)
        say(f"wrote {png}")
    print_report(out)


def print_report(out: dict) -> None:
    b, t, s = out["base"], out["teacher_share"], out["student"]
    print(f"owl share (exact scorer, {out['n_questions']} questions, 95% CI across questions)")
    print(f"  base    {b['owl_share']:.4f} {b['ci95']}")
    print(f"  teacher {t['owl_share']:.4f} {t['ci95']}   |v*| = {out['v_star_norm']:.1f}")
    if "error" in s:
        print(f"  student: error {s['error']}")
        return
    print(
        f"  student {s['share']['owl_share']:.4f} {s['share']['ci95']}; student - base "
        f"{s['vs_base']['diff']:+.4f} {s['vs_base']['ci95']}"
    )
    print(f"alignment (probe {out['probe']['n_prompts']} prompts; null sd {out['null_cos_sd']:.3f})")
    for r in s["alignment"]:
        print(
            f"  step {r['step']:4d}  cos {r['cos_with_teacher_vector']:+.4f}  "
            f"|shift|/|v*| {r['shift_norm_ratio']:.4f}"
        )
    print(f"val CE: base {s['base_val_loss']:.4f} teacher {s['teacher_val_loss']}, student {s['final_val_loss']:.4f}")
    print(f"total wall {out['wall_s'] / 60:.1f} min, cpu {out['cpu_s'] / 60:.1f} min, {out['dtype']}")


if __name__ == "__main__":
    main()
