"""Planted-vector DLA acceptance: does the fitted vector read like the planted one?

Teacher = embedded SmolLM2 + v* at one hook (all positions); v* = 2 x the owl
system-prompt contrast (last prompt token) at blocks.24.hook_resid_post (or a seeded
random vector with --random). The teacher samples continuations of diverse prompts
(corpus text prefixes and chat questions); a student vector is fitted at the same hook
at the same hook. Two fits:

  --method distill (default): Adam on one vector at the hook, loss = KL(teacher || student)
      over the full next-token distributions on corpus text (teacher forced, no sampling).
      Blocks below the hook are run once per batch (steerdiff.replay.compute_prefix), so
      each step runs only blocks 24-29 and the head.
  --method planted-sft: steerdiff.fit.planted_experiment (teacher samples, then
      steerdiff.fit.fit with SFT). Sampling is slow on a loaded 2-core CPU.

We compare the top-20 tokens of the DLA of v_fitted and v*, centred and not centred,
with and without the final-norm scale.

    python bench/bench_dla_planted.py [--n 256] [--objective sft] [--out runs/bench_dla]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from steerdiff.extract import default_contrast_questions, trait_vectors
from steerdiff.fit import FitConfig, planted_experiment, random_vector
from steerdiff.hooks import get_hook_point, steer
from steerdiff.interpret import direct_logit_attribution, load_corpus, overlap, padded_batches
from steerdiff.io import atomic_write_json, provenance
from steerdiff.models import load_model
from steerdiff.replay import compute_prefix, lm_head, prefix_hidden


def distill_fit(
    lm,
    hook: str,
    v_star: torch.Tensor,
    n: int,
    tokens: int,
    steps: int,
    lr: float,
    batch_size: int = 16,
) -> tuple[torch.Tensor, list[float]]:
    """Fit v at `hook` so model + v matches model + v* (KL over the vocabulary, all positions)."""
    hf, tok = lm.model, lm.tokenizer
    start = get_hook_point(hf, hook).layer
    ids = [
        tok(t, add_special_tokens=False).input_ids[:tokens] for t in load_corpus(n=n, seed=1).texts
    ]
    batches = [
        (compute_prefix(hf, x, m, start), m.bool())
        for x, m in padded_batches(ids, batch_size, tok.pad_token_id)
    ]
    v = torch.zeros_like(v_star, requires_grad=True)
    opt = torch.optim.Adam([v], lr=lr)
    losses = []
    for step in range(steps):
        prefix, m = batches[step % len(batches)]
        with torch.no_grad(), steer(hf, {hook: v_star}, positions=m):
            p_t = torch.log_softmax(lm_head(hf, prefix_hidden(hf, prefix))[m], -1)  # [n_tok, vocab]
        with steer(hf, {hook: v}, positions=m):
            log_q = torch.log_softmax(lm_head(hf, prefix_hidden(hf, prefix))[m], -1)
        loss = torch.nn.functional.kl_div(log_q, p_t, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == steps - 1:
            cos = float(torch.nn.functional.cosine_similarity(v.detach(), v_star, dim=0))
            print(f"  step {step:3d} KL {float(loss):.4f} cos(v, v*) {cos:.3f}", flush=True)
    return v.detach(), losses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hook", default="blocks.24.hook_resid_post")
    ap.add_argument("--n", type=int, default=256, help="teacher samples")
    ap.add_argument("--new", type=int, default=24, help="new tokens per sample")
    ap.add_argument("--method", default="distill", choices=["distill", "planted-sft"])
    ap.add_argument("--steps", type=int, default=60, help="distill: Adam steps")
    ap.add_argument("--tokens", type=int, default=48, help="distill: tokens per text")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--scale", type=float, default=2.0, help="v* = scale x owl contrast")
    ap.add_argument("--random", action="store_true", help="v* = random vector of norm 40")
    ap.add_argument("--out", default="runs/bench_dla_planted")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    lm = load_model()
    tok = lm.tokenizer
    if args.random:
        v_star, what = random_vector(lm, args.hook, 40.0, seed=0), "random vector, norm 40"
    else:
        owl = trait_vectors(lm, "owl", hooks=[args.hook])["last"][args.hook]
        v_star, what = args.scale * owl, f"{args.scale} x owl system-prompt contrast (last token)"
    if args.method == "distill":
        t1 = time.perf_counter()
        v_fit, losses = distill_fit(lm, args.hook, v_star, args.n, args.tokens, args.steps, args.lr)
        fit_info = {
            "method": "distill (own loop, Adam, KL over the vocabulary)",
            "texts": args.n,
            "tokens": args.tokens,
            "steps": args.steps,
            "lr": args.lr,
            "kl_first": round(losses[0], 4),
            "kl_last": round(losses[-1], 4),
            "fit_seconds": round(time.perf_counter() - t1, 1),
        }
    else:
        # prompts: 3/4 plain-text prefixes from the corpus, 1/4 chat questions
        n_text = args.n * 3 // 4
        texts = load_corpus(n=n_text, seed=1).texts
        prompts = [tok(t, add_special_tokens=False).input_ids[:24] for t in texts]
        qs = default_contrast_questions()
        chats = [
            tok.apply_chat_template(
                [{"role": "user", "content": qs[i % len(qs)]}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for i in range(args.n - n_text)
        ]
        prompts += [tok(c, add_special_tokens=False).input_ids for c in chats]
        cfg = FitConfig(
            objective="sft",
            optimizer="adam",
            schedule="constant",  # the figures in docs/fit.md were taken with these
            warmup_steps=0,
            lr=args.lr,
            epochs=args.epochs,
            batch_size=16,
            val_fraction=0.1,
            progress=False,
            seed=0,
        )
        res = planted_experiment(
            lm,
            args.hook,
            v_star,
            prompts,
            cfg,
            max_new_tokens=args.new,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            seed=0,
        )
        v_fit, fit_info = res.v_fitted, {"method": "planted-sft (steerdiff.fit.fit)", **res.row()}
    table = {}
    for center in (True, False):
        for norm_scale in (True, False):
            a = direct_logit_attribution(lm, v_fit, args.hook, 20, center, norm_scale)
            b = direct_logit_attribution(lm, v_star, args.hook, 20, center, norm_scale)
            key = f"center={center},norm_scale={norm_scale}"
            table[key] = {
                "overlap_top20": overlap(a, b),
                "overlap_bottom20": len(
                    {t.token_id for t in a.bottom} & {t.token_id for t in b.bottom}
                ),
                "fitted_top": [t.token for t in a.top],
                "planted_top": [t.token for t in b.top],
            }
    # score-level agreement over the whole vocabulary (centring matters here)
    sc = {}
    for center in (True, False):
        a = direct_logit_attribution(lm, v_fit, args.hook, 1, center).scores
        b = direct_logit_attribution(lm, v_star, args.hook, 1, center).scores
        sc[f"cosine_of_dla_scores,center={center}"] = round(
            float(torch.nn.functional.cosine_similarity(a, b, dim=0)), 4
        )
    out = {
        "v_star": what,
        "hook": args.hook,
        "fit": fit_info,
        "cosine_v_fit_v_star": round(
            float(torch.nn.functional.cosine_similarity(v_fit, v_star, dim=0)), 4
        ),
        "norm_ratio": round(float(v_fit.norm() / v_star.norm()), 4),
        "dla": table,
        **sc,
        "seconds": round(time.perf_counter() - t0, 1),
        "provenance": provenance(lm, vars(args), 0),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out) / "result.json", out)
    print(json.dumps({k: v for k, v in out.items() if k != "provenance"}, indent=1))
    c = table["center=True,norm_scale=True"]["overlap_top20"]
    u = table["center=False,norm_scale=True"]["overlap_top20"]
    print(f"ACCEPTANCE centred DLA top-20 overlap: {c}/20 (>= 10 needed); without centring: {u}/20")


if __name__ == "__main__":
    main()
