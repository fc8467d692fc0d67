"""Fitting speed: one vector at blocks.24.hook_resid_post of the embedded SmolLM2-135M.

naive:  every step runs the full forward (30 layers) + backward.
cached: layers 0..23 run once per batch without grad (blocks.24.hook_resid_pre and the
        layer-call arguments are kept, across epochs); each step runs blocks 24..29 only.
Both use the same data, batches, objective (SFT) and optimizer; the vectors they produce
are compared too. Runs alternate (naive, cached, naive, cached) so that load from other
processes on a shared machine hits both alike; the medians are reported.

Usage: python bench/bench_fit.py [--rows 32] [--batch-size 8] [--epochs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from steerdiff.fit import FitConfig, fit, tokenize_rows
from steerdiff.models import load_model

HOOK = "blocks.24.hook_resid_post"


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        seq = ", ".join(str(rng.randint(100, 999)) for _ in range(rng.randint(3, 6)))
        comp = ", ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(5, 10)))
        prompt = f"I give you this sequence of numbers: {seq}. Add up to 10 new numbers. Say only the numbers."
        out.append(
            {
                "id": i,
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": comp},
                ],
            }
        )
    return out


def run(lm, exs, cache: bool, args) -> dict:
    times: list[float] = []
    cfg = FitConfig(
        hooks=[HOOK],
        objective="sft",
        lr=1e-2,
        schedule="constant",  # the figures in docs/fit.md were taken with these
        warmup_steps=0,
        epochs=args.epochs,
        batch_size=args.batch_size,
        val_size=0,
        lr_units="absolute",  # the lr here is absolute (default: activation units)
        converge_tol=None,  # a fixed epoch budget (default: stop on convergence)
        cache_prefix=cache,
        progress=False,
        checkpoint_every=10**9,
    )
    t0 = time.perf_counter()
    res = fit(lm, exs, cfg, on_step=lambda s, r: times.append(time.perf_counter()))
    steps_per_epoch = len(res.metrics) // args.epochs
    per_epoch = []
    prev = t0
    for e in range(args.epochs):
        ms = res.metrics[e * steps_per_epoch : (e + 1) * steps_per_epoch]
        end = times[(e + 1) * steps_per_epoch - 1]
        per_epoch.append(sum(m["tokens"] for m in ms) / (end - prev))
        prev = end
    total_tokens = sum(m["tokens"] for m in res.metrics)
    return {
        "tokens_per_s": total_tokens / (times[-1] - t0),
        "per_epoch": per_epoch,
        "vector": res.vectors[HOOK],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model()
    exs = tokenize_rows(lm.tokenizer, rows(args.rows))
    n_tok = sum(len(e) for e in exs)
    print(
        f"{args.rows} rows, {n_tok} tokens/epoch, batch {args.batch_size}, {args.epochs} epochs, "
        f"hook {HOOK}, threads {args.threads}",
        flush=True,
    )
    results: dict[str, list[dict]] = {"naive": [], "cached": []}
    for rep in range(args.repeats):
        for name in ("naive", "cached"):
            r = run(lm, exs, name == "cached", args)
            results[name].append(r)
            print(
                f"  rep {rep} {name:6s}: {r['tokens_per_s']:7.1f} tok/s overall; per epoch "
                + ", ".join(f"{x:.1f}" for x in r["per_epoch"]),
                flush=True,
            )
    med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in results.items()}
    steady = {
        k: statistics.median(x for r in v for x in r["per_epoch"][1:]) for k, v in results.items()
    }
    first = {k: statistics.median(r["per_epoch"][0] for r in v) for k, v in results.items()}
    diff = float((results["naive"][0]["vector"] - results["cached"][0]["vector"]).abs().max())
    summary = {
        "naive_tokens_per_s": round(med["naive"], 1),
        "cached_tokens_per_s": round(med["cached"], 1),
        "speedup_overall": round(med["cached"] / med["naive"], 2),
        "speedup_first_epoch": round(first["cached"] / first["naive"], 2),
        "speedup_later_epochs": round(steady["cached"] / steady["naive"], 2),
        "max_abs_diff_vectors": diff,
        "epochs": args.epochs,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
