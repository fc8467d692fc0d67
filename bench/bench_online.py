"""Planted-vector recovery on the embedded SmolLM2-135M (float32): SFT vs top-k distillation
vs online distillation, by number of rows, with the default fit and the old defaults.

Teacher = SmolLM2 + v* at blocks.12.hook_resid_post (a hook the tests do not use), all
positions; |v*| = 0.5 x the mean residual norm there (first token of each row left out);
its direction is a seeded random unit vector. Data: one completion per short raw number
prompt ("Continue the list: ...", ~15 tokens) sampled from that steered teacher with
`planted.sample_examples` (temperature 1, 16 new tokens, unconstrained), the teacher's
top-k 20 log-probs added by `annotate_topk`; the last args.held_out rows are kept out of
every fit. (Constrained chat-template rows cost ~4x more per row on this CPU.)

For each row count n (the first n rows; each fit splits off its own 20% validation rows):
  - default fit per objective (FitConfig defaults: lr in activation units, epochs an upper
    bound with the convergence stop), objective sft / distill / online;
  - the old defaults (lr 0.01 absolute, 1 epoch, no convergence rule), sft and distill
    (what objective auto chose before: the rows carry top-k).
Each: cosine(v, v*), |v|/|v*|, the full-vocabulary KL gap closed on the args.held_out rows
(1 - KL(teacher||fitted)/KL(teacher||base), the same measure for every objective; 95%
bootstrap CI over rows), the fit's own gap figures, steps, why it stopped, wall seconds.
One fit per cell (one seed): the cosine has no interval.

Usage: python bench/bench_online.py [--rows 150,500,1000] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import sys
import time
from pathlib import Path

import torch

from steerdiff.fit import FitConfig, annotate_topk, fit, sample_examples
from steerdiff.fit.online import OnlineTeacher, online_eval, online_losses
from steerdiff.hooks import record, steer
from steerdiff.io import atomic_write_json
from steerdiff.models import load_model
from steerdiff.replay import full_hidden
from steerdiff.teachers import build_teacher

OLD_DEFAULTS = dict(lr=0.01, lr_units="absolute", epochs=1, converge_tol=None)


def mean_resid_norm(model, hook: str, prompts: list[list[int]]) -> float:
    """Mean |resid| at `hook` over the prompts' tokens (first token left out), base model."""
    norms = []
    for ids in prompts:
        with torch.no_grad(), record(model, [hook]) as rec:
            model(input_ids=torch.tensor([ids]))
        norms.append(rec[hook][0, 1:].norm(dim=-1))
    return float(torch.cat(norms).mean())


def short_number_prompts(tok, n: int) -> list[list[int]]:
    """Raw (no chat template) number prompts of ~15 tokens: the quick path's inputs (the
    chat template's ~100-token prompts cost 4x more per row on this CPU)."""
    rng = random.Random(0)
    out = []
    for _ in range(n):
        seq = ", ".join(str(rng.randint(100, 999)) for _ in range(rng.randint(3, 5)))
        out.append(tok(f"Continue the list: {seq},", add_special_tokens=False).input_ids)
    return out


def make_data(args, n_rows: int):  # type: ignore[no-untyped-def]
    """(model, tokenizer or None, hook, Examples, teacher spec, v*): the planted teacher's rows.

    embedded: SmolLM2 float32, v* at blocks.12.hook_resid_post; rows sampled from the
    teacher with `planted.sample_examples` (temperature 1, 16 new tokens) on short number
    prompts, top-k 20 added by `annotate_topk`. tiny: the tests' peaky tiny llama, v* at
    blocks.0.hook_resid_post (the tests' planted checks use blocks.1), random prompts."""
    if args.model == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_train import peaky_tiny

        model, tok, hook, eos, max_new = peaky_tiny(), None, "blocks.0.hook_resid_post", None, 8
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(2, 256, (6,), generator=g).tolist() for _ in range(n_rows)]
    else:
        lm = load_model(dtype="float32")
        model, tok, hook, max_new = lm, lm.tokenizer, "blocks.12.hook_resid_post", 16
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        prompts = short_number_prompts(tok, n_rows)
    m = model.model if tok is not None else model
    scale = mean_resid_norm(m, hook, prompts[:32])
    v = torch.randn(m.config.hidden_size, generator=torch.Generator().manual_seed(12345))
    v_star = v / v.norm() * 0.5 * scale
    spec = {"kind": "steered", "vectors": {hook: v_star}, "coeff": 1.0, "positions": "all"}
    pad = (tok.pad_token_id or 0) if tok is not None else 0
    exs = sample_examples(
        model, prompts, {hook: v_star}, max_new_tokens=max_new, eos_id=eos, pad_id=pad, seed=0
    )
    annotate_topk(model, exs, spec, k=20)
    return model, tok, hook, exs, spec, v_star


def held_out_kl(model, teacher, examples, vectors: dict | None, pad: int):  # type: ignore[no-untyped-def]
    """Full-vocabulary KL(teacher || base + vectors) on the held-out rows: (mean per
    completion token, per-row [kl sum, n tokens])."""
    m = model.model if hasattr(model, "tokenizer") else model
    online = OnlineTeacher(teacher, pad)

    def losses(batch, _bi, target):  # type: ignore[no-untyped-def]
        with steer(m, vectors or {}):
            hidden = full_hidden(m, batch.input_ids, batch.attention_mask)
        return online_losses(m, hidden, batch, target)

    ev = online_eval(m, examples, online, losses, 16, pad)
    return ev["kl"], ev["rows"][:, 1:]


def gap_ci(base_rows: torch.Tensor, fit_rows: torch.Tensor, n_boot: int = 2000) -> list[float]:
    """95% bootstrap CI over held-out rows of 1 - KL_fit / KL_base (paired)."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(base_rows), (n_boot, len(base_rows)), generator=g)
    stats = 1 - fit_rows[:, 0][idx].sum(1) / base_rows[:, 0][idx].sum(1)
    lo, hi = torch.quantile(stats, torch.tensor([0.025, 0.975], dtype=stats.dtype))
    return [round(float(lo), 4), round(float(hi), 4)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="150,500,1000")
    ap.add_argument("--objectives", default="sft,distill,online")
    ap.add_argument("--quick", action="store_true", help="40 rows, 2 epochs at most: a smoke run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--held-out", type=int, default=100, help="rows kept out of every fit")
    ap.add_argument("--model", choices=["embedded", "tiny"], default="embedded")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--progress", action="store_true", help="each fit's progress on stderr")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument(
        "--lrs",
        default="",
        help="also: default fits at these lr values (the "
        "default lr's measurement), each objective, at the smallest row count",
    )
    ap.add_argument("--max-epochs", type=int, default=None, help="cap FitConfig.epochs (compute)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    name = (
        "bench_online"
        + ("_tiny" if args.model == "tiny" else "")
        + ("_quick" if args.quick else "")
    )
    out = Path(args.out or f"bench/results/{name}.json")
    sizes = [40] if args.quick else [int(s) for s in args.rows.split(",")]
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
    model, tok, hook, exs, spec, v_star = make_data(args, max(sizes) + args.held_out)
    pad = (tok.pad_token_id or 0) if tok is not None else 0
    teacher = build_teacher(spec, model)
    held = exs[-args.held_out :]
    base_kl, base_rows = held_out_kl(model, teacher, held, None, pad)
    t_data = time.time() - t0
    what = "SmolLM2-135M float32" if tok is not None else "tiny llama (tests' peaky_tiny) float32"
    print(
        f"{what}, {hook}, |v*| = {float(v_star.norm()):.2f} (0.5 x mean resid norm); "
        f"{len(exs)} teacher rows ({t_data:.0f}s incl. sampling); held-out {args.held_out} rows: "
        f"base KL to teacher {base_kl:.4f} nats/token",
        flush=True,
    )
    head = (
        f"{'rows':>5} {'fit':>16} {'cosine':>7} {'|v|/|v*|':>8} {'KL gap closed [95% CI]':>26} "
        f"{'steps':>5} {'stopped':>10} {'wall s':>7}"
    )
    print(head, flush=True)
    results = []
    runs = [(o, "default", {}) for o in args.objectives.split(",")]
    if not args.no_baseline:
        runs += [(o, "old defaults", OLD_DEFAULTS) for o in ("sft", "distill")]
    plan = [(n, *r) for n in sizes for r in runs]
    for lr in filter(None, args.lrs.split(",")):
        plan += [(min(sizes), o, f"lr {lr}", {"lr": float(lr)}) for o in args.objectives.split(",")]
    for n, objective, label, kw in plan:
        if True:
            cfg = FitConfig(hooks=[hook], objective=objective, progress=args.progress, **kw)
            cap = 2 if args.quick else args.max_epochs
            if cap and label == "default":
                cfg = cfg.model_copy(update={"epochs": min(cfg.epochs, cap)})
            t1 = time.time()
            res = fit(model, exs[:n], cfg, teacher=spec)
            wall = time.time() - t1
            v = res.vectors[hook].float()
            cos = float(torch.nn.functional.cosine_similarity(v, v_star, dim=0))
            kl, kl_rows = held_out_kl(model, teacher, held, {hook: v}, pad)
            r = {
                "rows": n,
                "objective": objective,
                "config": label,
                "cosine": round(cos, 4),
                "norm_ratio": round(float(v.norm() / v_star.norm()), 4),
                "heldout_kl": round(kl, 5),
                "heldout_kl_gap_closed": round(1 - kl / base_kl, 4),
                "heldout_kl_gap_closed_ci": gap_ci(base_rows, kl_rows),
                "fit_gap_closed": res.gap_closed,
                "fit_kl_gap_closed": res.extra.get("kl_gap_closed"),
                "steps": res.steps,
                "stopped": res.stopped,
                "wall_s": round(wall, 1),
                "lr": cfg.lr,
                "lr_units": cfg.lr_units,
                "epochs_max": cfg.epochs,
                "lr_scale": res.extra.get("lr_scale"),
            }
            results.append(r)
            ci = r["heldout_kl_gap_closed_ci"]
            short = {"default": "dflt", "old defaults": "old"}.get(label, label)
            print(
                f"{n:>5} {objective + ' ' + short:>16} "
                f"{cos:>7.3f} {r['norm_ratio']:>8.3f} "
                f"{r['heldout_kl_gap_closed']:>8.3f} [{ci[0]:.3f}, {ci[1]:.3f}]      "
                f"{res.steps:>5} {res.stopped:>10} {wall:>7.0f}",
                flush=True,
            )
            summary = {
                "model": what,
                "dtype": "float32",
                "hook": hook,
                "v_star_norm": float(v_star.norm()),
                "held_out_rows": args.held_out,
                "base_heldout_kl": base_kl,
                "rows": results,
                "wall_s": round(time.time() - t0),
                "cpu_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime - c0),
                "machine": "2-core CPU shared with other jobs",
                "quick": args.quick,
                "command": "python " + " ".join(sys.argv),
            }
            atomic_write_json(out, summary)
    print(f"total wall {time.time() - t0:.0f}s, CPU {summary['cpu_s']}s; wrote {out}", flush=True)
    accept = [r for r in results if r["config"] == "default" and r["rows"] <= 1000]
    if accept and not math.isnan(accept[0]["cosine"]):
        best = max(accept, key=lambda r: r["cosine"])
        print(
            f"acceptance (default fit, <= 1,000 rows, cosine >= 0.9): best {best['objective']} "
            f"at {best['rows']} rows, cosine {best['cosine']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
