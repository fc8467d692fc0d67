"""Planted-vector DLA acceptance: does the fitted vector read like the planted one?

Teacher = embedded SmolLM2 + v* at one hook (all positions); v* = 2 x the owl
system-prompt contrast (last prompt token) at blocks.24.hook_resid_post (or a seeded
random vector with --random). The teacher samples continuations of diverse prompts
(corpus text prefixes and chat questions); a student vector is fitted at the same hook
with steerdiff.train.fit (Adam, via planted.planted_experiment). We compare the top-20
tokens of the DLA of v_fitted and v*, centred and not centred, with and without the
final-norm scale.

    python bench/bench_dla_planted.py [--n 256] [--objective sft] [--out runs/bench_dla]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from steerdiff.extract import default_contrast_questions, trait_vectors
from steerdiff.interpret.corpus import load_corpus
from steerdiff.interpret.dla import direct_logit_attribution, overlap
from steerdiff.io import atomic_write_json, provenance
from steerdiff.models import load_model
from steerdiff.planted import planted_experiment, random_vector
from steerdiff.train import FitConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hook", default="blocks.24.hook_resid_post")
    ap.add_argument("--n", type=int, default=256, help="teacher samples")
    ap.add_argument("--new", type=int, default=24, help="new tokens per sample")
    ap.add_argument("--objective", default="sft", choices=["sft", "distill"])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.05)
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
    # prompts: 3/4 plain-text prefixes from the corpus, 1/4 chat questions
    n_text = args.n * 3 // 4
    texts = load_corpus(n=n_text, seed=1).texts
    prompts = [tok(t, add_special_tokens=False).input_ids[:24] for t in texts]
    qs = default_contrast_questions()
    chats = [
        tok.apply_chat_template([{"role": "user", "content": qs[i % len(qs)]}], tokenize=False,
                                add_generation_prompt=True)
        for i in range(args.n - n_text)
    ]
    prompts += [tok(c, add_special_tokens=False).input_ids for c in chats]
    cfg = FitConfig(objective=args.objective, optimizer="adam", lr=args.lr, epochs=args.epochs,
                    batch_size=16, val_fraction=0.1, progress=False, seed=0)
    res = planted_experiment(lm, args.hook, v_star, prompts, cfg, max_new_tokens=args.new,
                             eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0)
    v_fit = res.v_fitted
    table = {}
    for center in (True, False):
        for norm_scale in (True, False):
            a = direct_logit_attribution(lm, v_fit, args.hook, 20, center, norm_scale)
            b = direct_logit_attribution(lm, v_star, args.hook, 20, center, norm_scale)
            key = f"center={center},norm_scale={norm_scale}"
            table[key] = {
                "overlap_top20": overlap(a, b),
                "overlap_bottom20": len({t.token_id for t in a.bottom} & {t.token_id for t in b.bottom}),
                "fitted_top": [t.token for t in a.top],
                "planted_top": [t.token for t in b.top],
            }
    # score-level agreement over the whole vocabulary (centring matters here)
    sc = {}
    for center in (True, False):
        a = direct_logit_attribution(lm, v_fit, args.hook, 1, center).scores
        b = direct_logit_attribution(lm, v_star, args.hook, 1, center).scores
        sc[f"cosine_of_dla_scores,center={center}"] = round(
            float(torch.nn.functional.cosine_similarity(a, b, dim=0)), 4)
    out = {
        "v_star": what,
        "hook": args.hook,
        "fit": res.row(),
        "cosine_v_fit_v_star": round(res.cosine, 4),
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
