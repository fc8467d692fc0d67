"""Claim 3: are adaptive optimisers necessary for the trait to transfer?

Blank et al. 2026 (arXiv 2606.00995) report Adam transfers the trait where SGD at matched
loss does not (57% vs 0% target rate); arXiv 2606.00831 reports SGD ~ AdamW.

Teacher: the demo's steered teacher (bench/_owl.py: SmolLM2-135M + 2.0 x the owl contrast
vector at blocks.24.hook_resid_post), 320 constrained number prompts with top-20
log-probs, of which the first `--n-train` (64) + 16 validation rows are used.
Vector students at the steered hook (cheap: the layers below it run once), distillation
on the stored top-20 log-probs, 3 epochs of batch 8 (24 steps), constant lr, each
optimiser at its best learning rate from a small sweep (best = lowest final validation
KL, i.e. compared at matched loss): Adam (0.3, 1.0), SGD with momentum 0.9 (lr matched to
Adam's step from the first gradient norm, see SGD_MATCH), SignSGD with momentum 0.9 (0.3),
AdamW with weight decay 0.01 (0.3). Figures: cos(v, v*), |v| / |v*|, owl share.
LoRA students (the paper's claim is about finetuning weights) come from
bench_alignment.py (Adam vs SGD, r = alpha = 8, SFT) and are printed here beside them.
Owl share = exact scorer (30 questions; 95% CI across questions), with the base model's
and the teacher's share, and each student's paired difference from base.

Usage: python bench/bench_optimizers.py [--quick] [--resume] [--out bench/results/optimizers.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _owl  # noqa: E402
from _owl import COEFF, HOOK, Clock, say  # noqa: E402

# learning rates: Adam / AdamW / SignSGD per coordinate; SGD's are set from the first
# Adam fit's first gradient norm g1 so that its steady-state step with momentum 0.9
# (10 x lr x |g|) matches Adam's largest possible step (lr x sqrt(d)) at lr 0.3 and 1.0,
# and 3x beyond: lr = k x sqrt(d) / (10 g1), k in SGD_MATCH
VECTOR_GRID = {
    "adam": dict(optimizer="adam", lrs=[0.3, 1.0]),
    "sgd": dict(optimizer="sgd", momentum=0.9, lrs=[]),  # set from g1
    "signsgd": dict(optimizer="signsgd", momentum=0.9, lrs=[0.3]),
    "adamw": dict(optimizer="adamw", weight_decay=0.01, lrs=[0.3]),
}
SGD_MATCH = [1.0, 3.0]


def vector_student(lm, data, cfg, v_star, n_questions, base) -> dict:  # type: ignore[no-untyped-def]
    from steerdiff.fit import FitError, fit

    say(f"vector fit {_owl.describe(cfg)}")
    clock = Clock()
    try:
        res = fit(lm, data, cfg)
    except FitError as e:
        return {"optimizer": cfg.optimizer, "lr": cfg.lr, "error": str(e).splitlines()[0]}
    v = res.vectors[HOOK].float()
    share = _owl.owl_share(lm, n_questions, {HOOK: v})
    last = res.metrics[-1]
    return {
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "steps": res.steps,
        "first_grad_norm": res.metrics[0]["grad_norm"],
        "final_val_loss": last.get("val_kl", last.get("val_loss")),  # the objective's
        "val_ce": res.fitted_val_loss,
        "cos_with_v_star": _owl.cosine(v, v_star),
        "norm_ratio": float(v.norm() / v_star.norm()),
        "share": share,
        "vs_base": _owl.paired(share, base),
        **clock.figures(),
    }


def best(runs: list[dict]) -> dict | None:
    ok = [r for r in runs if "error" not in r and r.get("final_val_loss") is not None]
    return min(ok, key=lambda r: r["final_val_loss"]) if ok else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke check)")
    ap.add_argument("--out", default=str(_owl.RESULTS / "optimizers.json"))
    ap.add_argument("--n-prompts", type=int, default=320)
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument(
        "--lora-from",
        default=str(_owl.RESULTS / "alignment.json"),
        help="bench_alignment.py's results: its LoRA Adam / SGD students are printed here",
    )
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.n_prompts, args.n_train, args.questions, args.epochs = 32, 8, 5, 1
    done: dict = {}
    if args.resume and Path(args.out).exists():
        for name, d in json.loads(Path(args.out).read_text())["vector"].items():
            for r in d["runs"]:
                done[(name, r["lr"])] = r
    grid = (
        {k: {**g, "lrs": g["lrs"][:1]} for k, g in VECTOR_GRID.items()}
        if args.quick
        else VECTOR_GRID
    )
    match = SGD_MATCH[:1] if args.quick else SGD_MATCH
    clock = Clock()
    lm = _owl.load()
    v_star = COEFF * _owl.owl_vector(lm)
    data = _owl.teacher_data(lm, args.n_prompts)
    rows = _owl.rows(data, args.n_train, 16)
    nq = args.questions
    base = _owl.cached_share(lm, "base", nq)
    teacher = _owl.cached_share(lm, "teacher", nq, {HOOK: v_star})
    say(f"base {_owl.strip(base)}; teacher {_owl.strip(teacher)}; |v*| {float(v_star.norm()):.1f}")
    d = v_star.numel()
    out: dict = {
        "claim": "3: adaptive optimisers are necessary (Adam transfers, SGD does not)",
        "model": "embedded SmolLM2-135M-Instruct",
        "dtype": str(lm.model.dtype),
        "teacher": {"kind": "steered", "animal": "owl", "hook": HOOK, "coeff": COEFF},
        "v_star_norm": float(v_star.norm()),
        "data": {
            "file": data.name,
            "n_prompts": args.n_prompts,
            "n_train": args.n_train,
            "n_val": 16,
        },
        "n_questions": nq,
        "base": base,
        "teacher_share": teacher,
        "vector": {},
    }

    def save() -> None:
        out.update(clock.figures())
        _owl.write_json(args.out, out)

    g1 = None
    for name, g in grid.items():
        kw = {k: v for k, v in g.items() if k != "lrs"}
        lrs = g["lrs"]
        if name == "sgd":
            lrs = [round(k * d**0.5 / (10 * g1), 6) for k in match] if g1 else [1.0]
        runs = []
        for lr in lrs:
            cfg = _owl.pinned(
                objective="distill",
                lr=lr,
                epochs=args.epochs,
                batch_size=args.batch_size,
                micro_batch_size=args.batch_size,
                **kw,
            )
            if (name, lr) in done:
                runs.append(done[(name, lr)])
            else:
                runs.append(vector_student(lm, rows, cfg, v_star, nq, base))
            if g1 is None and "first_grad_norm" in runs[-1]:
                g1 = runs[-1]["first_grad_norm"]
            out["vector"][name] = {"runs": runs, "best": best(runs), "config": _owl.describe(cfg)}
            save()
    lora = Path(args.lora_from)
    if lora.exists():
        out["lora_from"] = lora.name
        out["lora"] = {
            k: {"runs": [s], "best": s} for k, s in json.loads(lora.read_text())["students"].items()
        }
    save()
    print_table(out)


def print_table(out: dict) -> None:
    b, t = out["base"], out["teacher_share"]
    print(f"owl share (exact scorer, {out['n_questions']} questions, 95% CI across questions)")
    print(f"  base    {b['owl_share']:.4f} {b['ci95']}")
    print(f"  teacher {t['owl_share']:.4f} {t['ci95']}   |v*| = {out['v_star_norm']:.1f}")
    for kind in ("vector", "lora"):
        if kind == "lora" and "lora_from" in out:
            print(f"LoRA students (SFT, r=alpha=8; from {out['lora_from']}):")
        for name, d in out.get(kind, {}).items():
            for r in d["runs"]:
                if "error" in r:
                    print(f"  {kind:6s} {name:8s} lr {r['lr']:<8g} error: {r['error'][:80]}")
                    continue
                mark = "*" if d["best"] is r or (d["best"] and d["best"]["lr"] == r["lr"]) else " "
                s, dv = r["share"], r["vs_base"]
                extra = (
                    f"|v|/|v*| {r['norm_ratio']:.3f}"
                    if kind == "vector"
                    else (f"|shift|/|v*| {r['shift_norm_ratio']:.3f}")
                )
                print(
                    f" {mark}{kind:6s} {name:8s} lr {r['lr']:<8g} val {r['final_val_loss']:.4f} "
                    f"cos {r['cos_with_v_star']:+.3f} {extra} share {s['owl_share']:.4f} "
                    f"{s['ci95']} - base {dv['diff']:+.4f} {dv['ci95']} ({r['wall_s']:.0f}s)"
                )
    print("* = best lr of that optimiser (lowest final validation loss of its objective)")
    print(
        f"total wall {out['wall_s'] / 60:.1f} min, cpu {out['cpu_s'] / 60:.1f} min, {out['dtype']}"
    )


if __name__ == "__main__":
    main()
