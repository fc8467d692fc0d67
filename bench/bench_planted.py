"""Planted-vector recovery: cosine(fitted, v*) vs number of teacher samples,
SFT vs top-k distillation, Adam vs SGD.

Teacher = model + v* (random direction, fixed norm) at one hook, all positions; it samples
one completion per prompt (temperature 1); distillation also stores its top-k log-probs.
The student is fitted at the same hook on those samples with a fixed budget of
optimizer steps (so larger datasets are not given more steps).

Model: a tiny random llama (3 layers, d_model 64, init std 0.2 so its next-token
distributions are not flat), hook blocks.1.hook_resid_post, |v*| = 4 — chosen so the
full grid (up to 3,000 samples) runs in minutes on 2 shared CPU cores. With --embedded
the same experiment runs on SmolLM2-135M (blocks.20.hook_resid_post, number prompts),
much slower; use small --sizes there.

Usage: python bench/bench_planted.py [--sizes 100,300,1000,3000] [--steps 150] [--embedded]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from steerdiff.fit import (
    FitConfig,
    annotate_topk,
    planted_experiment,
    random_vector,
    sample_examples,
)

OPTIMIZERS = {
    "adam": dict(optimizer="adam", lr=0.05),
    "sgd": dict(optimizer="sgd", lr=5.0, momentum=0.9),
}


def tiny_model() -> tuple[torch.nn.Module, str, float, list[list[int]], int | None, int]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_train import HOOK, peaky_tiny

    m = peaky_tiny()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 256, (6,), generator=g).tolist() for _ in range(3000)]
    return m, HOOK, 4.0, prompts, None, 8


def embedded_model():  # type: ignore[no-untyped-def]
    from steerdiff.models import load_model

    lm = load_model()
    tok = lm.tokenizer
    rng = random.Random(0)
    prompts = []
    for _ in range(3000):
        seq = ", ".join(str(rng.randint(100, 999)) for _ in range(rng.randint(3, 5)))
        text = f"I give you this sequence of numbers: {seq}. Add up to 10 new numbers. Say only the numbers."
        prompts.append(
            tok(
                tok.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
                ),
                add_special_tokens=False,
            ).input_ids
        )
    return (
        lm,
        "blocks.20.hook_resid_post",
        8.0,
        prompts,
        tok.convert_tokens_to_ids("<|im_end|>"),
        24,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,300,1000,3000")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--embedded", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm, hook, norm, prompts, eos, max_new = embedded_model() if args.embedded else tiny_model()
    v_star = random_vector(lm, hook, norm, seed=3)
    sizes = [int(s) for s in args.sizes.split(",")]
    t0 = time.time()
    pool = sample_examples(
        lm, prompts[: max(sizes)], {hook: v_star}, max_new_tokens=max_new, eos_id=eos, seed=0
    )
    annotate_topk(lm, pool, {"kind": "steered", "vectors": {hook: v_star}}, k=32)
    print(
        f"hook {hook}, |v*| = {norm}, {len(pool)} teacher samples ({time.time() - t0:.0f}s), "
        f"{args.steps} steps of batch {args.batch_size} per fit",
        flush=True,
    )
    print(
        f"{'n':>6} {'objective':>9} {'opt':>5} {'cosine':>7} {'|v|/|v*|':>9} {'val_ce':>7} {'gap':>6}"
    )
    rows = []
    for n in sizes:
        exs = pool[:n]
        n_train = n - max(8, n // 10)
        epochs = max(1, -(-args.steps * args.batch_size // n_train))
        for objective in ("sft", "distill"):
            for opt, kw in OPTIMIZERS.items():
                cfg = FitConfig(
                    objective=objective,
                    schedule="constant",  # the figures in docs/fit.md were taken with these
                    warmup_steps=0,
                    lr_units="absolute",  # (issue 18 defaults: activation units, and a
                    converge_tol=None,  # convergence stop: pinned off for those figures)
                    epochs=epochs,
                    max_steps=args.steps,
                    batch_size=args.batch_size,
                    val_size=max(8, n // 10),
                    progress=False,
                    **kw,
                )
                r = planted_experiment(lm, hook, v_star, [], cfg, examples=exs)
                row = r.row()
                rows.append(row)
                gap = row["gap_closed"]
                print(
                    f"{n:>6} {objective:>9} {opt:>5} {row['cosine']:>7.3f} {row['norm_ratio']:>9.3f} "
                    f"{row['val_loss']:>7.4f} {gap if gap is None else round(gap, 2)!s:>6}",
                    flush=True,
                )
    print(json.dumps({"rows": rows, "seconds": round(time.time() - t0)}))


if __name__ == "__main__":
    main()
