"""Claim 2: does a finetuned student learn to align with the teacher's steering vector?

Blank et al. 2026 (arXiv 2606.00995) measure, over finetuning, the cosine between the
student's induced activation shift (student minus base) and the teacher's vector.

Teacher: the demo's steered teacher (bench/_owl.py: SmolLM2-135M + 2.0 x the owl contrast
vector at blocks.24.hook_resid_post), 320 constrained number prompts, of which the first
`--n-train` + 16 rows are used (16 for validation). Students: LoRA r = alpha = 8 on
q,k,v,o,gate,up,down (the paper's setting), SFT on the completions, batch 8, one per
`--optimizers` entry (name:lr; default Adam and SGD with momentum 0.9: these two runs are
also claim 3's LoRA comparison, printed by bench_optimizers.py).
Every `--every` steps fit.alignment.AlignmentLogger measures the student's mean activation
shift at blocks.24.hook_resid_post over `--probe` held-out number prompts (all positions)
and its cosine with v* (and |shift| / |v*|). Null: the cosine of a random direction with v* has
standard deviation 1/sqrt(576) = 0.042. The owl share (exact scorer, 30 questions) of
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
    ap.add_argument("--n-train", type=int, default=96)
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--optimizers", default="adam:0.003,sgd:0.3")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--probe", type=int, default=16)
    ap.add_argument(
        "--data-teacher",
        default="steered",
        choices=["steered", "plain"],
        help="plain: the control, students of the base model's own numbers (same prompts)",
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.n_prompts, args.n_train, args.questions, args.probe = 32, 8, 5, 4
    clock = Clock()
    lm = _owl.load()
    v_star = COEFF * _owl.owl_vector(lm)
    if args.data_teacher == "plain":  # only the rows used are written
        args.n_prompts = args.n_train + 16
    data = _owl.teacher_data(lm, args.n_prompts, kind=args.data_teacher)
    rows = _owl.rows(data, args.n_train, 16)
    base = _owl.cached_share(lm, "base", args.questions)
    teacher = _owl.cached_share(lm, "teacher", args.questions, {HOOK: v_star})
    probe = _owl.probe_prompts(lm, args.probe)
    say(f"base {_owl.strip(base)}; teacher {_owl.strip(teacher)}")
    out = {
        "claim": "2: the student aligns with the teacher's steering vector during finetuning",
        "model": "embedded SmolLM2-135M-Instruct",
        "dtype": str(lm.model.dtype),
        "teacher": {"kind": "steered", "animal": "owl", "hook": HOOK, "coeff": COEFF},
        "data_teacher": args.data_teacher,
        "v_star_norm": float(v_star.norm()),
        "data": {
            "file": data.name,
            "n_prompts": args.n_prompts,
            "n_train": args.n_train,
            "n_val": 16,
        },
        "probe": {"n_prompts": args.probe, "positions": "all", "hook": HOOK},
        "null_cos_sd": 1 / float(v_star.numel()) ** 0.5,
        "n_questions": args.questions,
        "lora": {"r": 8, "alpha": 8, "targets": "q,k,v,o,gate,up,down"},
        "base": base,
        "teacher_share": teacher,
        "students": {},
    }
    for spec in args.optimizers.split(","):
        name, lr = spec.split(":")
        kw = {"momentum": 0.9} if name in ("sgd", "signsgd") else {}
        cfg = _owl.pinned(
            objective="sft",
            optimizer=name,
            lr=float(lr),
            epochs=args.epochs,
            batch_size=args.batch_size,
            micro_batch_size=args.batch_size,
            **kw,
        )
        run = _owl.lora_student(lm, rows, cfg, v_star, probe, args.questions, base, args.every)
        out["students"][name] = {
            **run,
            "optimizer": name,
            "lr": float(lr),
            "config": _owl.describe(cfg),
        }
        out.update(clock.figures())
        _owl.write_json(args.out, out)
        plot(out, Path(args.out).with_suffix(".png"))
    print_report(out)


def plot(out: dict, png: Path) -> None:
    from steerdiff.interpret.plots import alignment_png

    curves = {
        f"LoRA, {k} lr {s['lr']:g}": s["alignment"]
        for k, s in out["students"].items()
        if s.get("alignment")
    }
    if curves:
        alignment_png(curves, png, f"LoRA students of the owl-steered teacher: {HOOK}")
        say(f"wrote {png}")


def print_report(out: dict) -> None:
    b, t = out["base"], out["teacher_share"]
    print(f"owl share (exact scorer, {out['n_questions']} questions, 95% CI across questions)")
    print(f"  base    {b['owl_share']:.4f} {b['ci95']}")
    print(f"  teacher {t['owl_share']:.4f} {t['ci95']}   |v*| = {out['v_star_norm']:.1f}")
    for name, s in out["students"].items():
        print_student(name, s, out)
    print(
        f"total wall {out['wall_s'] / 60:.1f} min, cpu {out['cpu_s'] / 60:.1f} min, {out['dtype']}"
    )


def print_student(name: str, s: dict, out: dict) -> None:
    print(f"LoRA student, {name} lr {s['lr']:g} ({s.get('wall_s', 0) / 60:.1f} min)")
    if "error" in s:
        print(f"  error {s['error']}")
        return
    print(
        f"  student {s['share']['owl_share']:.4f} {s['share']['ci95']}; student - base "
        f"{s['vs_base']['diff']:+.4f} {s['vs_base']['ci95']}"
    )
    print(
        f"alignment (probe {out['probe']['n_prompts']} prompts; null sd {out['null_cos_sd']:.3f})"
    )
    for r in s["alignment"]:
        print(
            f"  step {r['step']:4d}  cos {r['cos_with_teacher_vector']:+.4f}  "
            f"|shift|/|v*| {r['shift_norm_ratio']:.4f}"
        )
    print(f"  val CE: base {s['base_val_loss']:.4f}, student {s['final_val_loss']:.4f}")


if __name__ == "__main__":
    main()
