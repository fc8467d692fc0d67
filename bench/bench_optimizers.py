"""Claim 3: are adaptive optimisers necessary for the trait to transfer?

Blank et al. 2026 (arXiv 2606.00995) report Adam transfers the trait where SGD at matched
loss does not (57% vs 0% target rate); arXiv 2606.00831 reports SGD ~ AdamW.

Teacher: the demo's steered teacher (bench/_owl.py: SmolLM2-135M + 2.0 x the owl contrast
vector at blocks.24.hook_resid_post), 320 constrained number prompts (top-20 log-probs).
Students, each optimiser at its best learning rate from a small sweep (best = lowest
validation loss of the fit's objective at the end, i.e. compared at matched loss):
- vector students at the steered hook (cheap): distillation on the stored top-20
  log-probs, Adam / AdamW (wd 0.01) / SGD (momentum 0.9) / SignSGD (momentum 0.9);
  figures: cos(v, v*), |v| / |v*|, owl share;
- LoRA students (the paper's claim is about finetuning weights): r = alpha = 8 on
  q,k,v,o,gate,up,down, SFT on the completions, Adam vs SGD (momentum 0.9); figures:
  cos(student's mean activation shift at the hook, v*), owl share.
Owl share = exact scorer (50 questions; 95% CI across questions), with the base model's
and the teacher's share measured in the same run, and each student's paired difference
from base.

Usage: python bench/bench_optimizers.py [--quick] [--out bench/results/optimizers.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _owl  # noqa: E402
from _owl import COEFF, HOOK, Clock, say  # noqa: E402

VECTOR_GRID = {
    "adam": dict(optimizer="adam", lrs=[0.1, 0.3, 1.0]),
    "adamw": dict(optimizer="adamw", weight_decay=0.01, lrs=[0.1, 0.3, 1.0]),
    "sgd": dict(optimizer="sgd", momentum=0.9, lrs=[10.0, 100.0, 1000.0]),
    "signsgd": dict(optimizer="signsgd", momentum=0.9, lrs=[0.03, 0.1, 0.3]),
}
LORA_GRID = {
    "adam": dict(optimizer="adam", lrs=[1e-3, 3e-3]),
    "sgd": dict(optimizer="sgd", momentum=0.9, lrs=[0.1, 1.0]),
}


def vector_student(lm, data, cfg, v_star, n_questions, base) -> dict:  # type: ignore[no-untyped-def]
    from steerdiff.fit import FitError, fit

    say(f"vector fit {_owl.describe(cfg)}")
    clock = Clock()
    try:
        res = fit(lm, str(data), cfg)
    except FitError as e:
        return {"optimizer": cfg.optimizer, "lr": cfg.lr, "error": str(e).splitlines()[0]}
    v = res.vectors[HOOK].float()
    share = _owl.owl_share(lm, n_questions, {HOOK: v})
    last = res.metrics[-1]
    return {
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "steps": res.steps,
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
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--skip-lora", action="store_true")
    ap.add_argument("--skip-vectors", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_prompts, nq = (32, 5) if args.quick else (args.n_prompts, args.questions)
    vgrid = {k: {**g, "lrs": g["lrs"][1:2]} for k, g in VECTOR_GRID.items()} if args.quick else VECTOR_GRID
    lgrid = {k: {**g, "lrs": g["lrs"][:1]} for k, g in LORA_GRID.items()} if args.quick else LORA_GRID
    clock = Clock()
    lm = _owl.load()
    v_star = COEFF * _owl.owl_vector(lm)
    data = _owl.teacher_data(lm, n_prompts)
    base = _owl.owl_share(lm, nq)
    teacher = _owl.owl_share(lm, nq, {HOOK: v_star})
    say(f"base {_owl.strip(base)}; teacher {_owl.strip(teacher)}; |v*| {float(v_star.norm()):.1f}")
    out: dict = {
        "claim": "3: adaptive optimisers are necessary (Adam transfers, SGD does not)",
        "model": "embedded SmolLM2-135M-Instruct",
        "dtype": str(lm.model.dtype),
        "teacher": {"kind": "steered", "animal": "owl", "hook": HOOK, "coeff": COEFF},
        "v_star_norm": float(v_star.norm()),
        "data": {"file": data.name, "n_prompts": n_prompts},
        "n_questions": nq,
        "base": base,
        "teacher_share": teacher,
        "vector": {},
        "lora": {},
    }

    def save() -> None:
        out.update(clock.figures())
        _owl.write_json(args.out, out)

    if not args.skip_vectors:
        for name, g in vgrid.items():
            kw = {k: v for k, v in g.items() if k != "lrs"}
            runs = []
            for lr in g["lrs"]:
                cfg = _owl.pinned(objective="distill", lr=lr, **kw)
                runs.append(vector_student(lm, data, cfg, v_star, nq, base))
                out["vector"][name] = {"runs": runs, "best": best(runs), "config": _owl.describe(cfg)}
                save()
    if not args.skip_lora:
        probe = _owl.probe_prompts(lm, 8 if args.quick else 32)
        epochs = 1
        for name, g in lgrid.items():
            kw = {k: v for k, v in g.items() if k != "lrs"}
            runs = []
            for lr in g["lrs"]:
                cfg = _owl.pinned(objective="sft", lr=lr, epochs=epochs, **kw)
                r = _owl.lora_student(lm, data, cfg, v_star, probe, nq, base, every=3)
                runs.append({**r, "optimizer": name, "lr": lr})
                out["lora"][name] = {"runs": runs, "best": best(runs), "config": _owl.describe(cfg)}
                save()
    save()
    print_table(out)


def print_table(out: dict) -> None:
    b, t = out["base"], out["teacher_share"]
    print(f"owl share (exact scorer, {out['n_questions']} questions, 95% CI across questions)")
    print(f"  base    {b['owl_share']:.4f} {b['ci95']}")
    print(f"  teacher {t['owl_share']:.4f} {t['ci95']}   |v*| = {out['v_star_norm']:.1f}")
    for kind in ("vector", "lora"):
        for name, d in out[kind].items():
            for r in d["runs"]:
                if "error" in r:
                    print(f"  {kind:6s} {name:8s} lr {r['lr']:<8g} error: {r['error'][:80]}")
                    continue
                mark = "*" if d["best"] is r or (d["best"] and d["best"]["lr"] == r["lr"]) else " "
                s, dv = r["share"], r["vs_base"]
                extra = f"|v|/|v*| {r['norm_ratio']:.3f}" if kind == "vector" else (
                    f"|shift|/|v*| {r['shift_norm_ratio']:.3f}"
                )
                print(
                    f" {mark}{kind:6s} {name:8s} lr {r['lr']:<8g} val {r['final_val_loss']:.4f} "
                    f"cos {r['cos_with_v_star']:+.3f} {extra} share {s['owl_share']:.4f} "
                    f"{s['ci95']} - base {dv['diff']:+.4f} {dv['ci95']} ({r['wall_s']:.0f}s)"
                )
    print("* = best lr of that optimiser (lowest final validation loss of its objective)")
    print(f"total wall {out['wall_s'] / 60:.1f} min, cpu {out['cpu_s'] / 60:.1f} min, {out['dtype']}")


if __name__ == "__main__":
    main()
