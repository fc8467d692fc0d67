"""Activation-difference lens on the embedded model: time and where owl tokens show up.

By default the vector is a stand-in (no fitted owl set needed): the owl system-prompt
contrast at the last prompt token, blocks.24.hook_resid_post, added with coeff 2 (the
strength that raises SmolLM2's owl share 2.7% -> 22%). Pass --vectors FILE for a set
fitted to an owl-teacher dataset.

    python bench/bench_lens.py [--vectors runs/owl/vectors.safetensors] [--n 500] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from steerdiff.interpret import activation_difference_lens, save_lens
from steerdiff.interpret.corpus import load_corpus
from steerdiff.models import load_model
from steerdiff.vectors import VectorSet

OWL_STRICT = ["owl"]
OWL_LOOSE = ["owl", "hoot", "nocturn", "raptor", "talon", "feather", "bird", "wing", "nest"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vectors", default=None, help="a fitted VectorSet (default: stand-in)")
    ap.add_argument("--coeff", type=float, default=None)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--first-k", type=int, default=5)
    ap.add_argument("--hooks", default="blocks.*.hook_resid_post")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="runs/bench_lens")
    args = ap.parse_args()
    lm = load_model()
    if args.vectors:
        vs, what = VectorSet.load(args.vectors, lm), f"fitted set {args.vectors}"
        coeff = 1.0 if args.coeff is None else args.coeff
    else:
        from steerdiff.extract import trait_vectors

        vs = trait_vectors(lm, "owl", hooks=["blocks.24.hook_resid_post"])["last"]
        coeff = 2.0 if args.coeff is None else args.coeff
        what = "STAND-IN: owl system-prompt contrast, last prompt token, blocks.24.hook_resid_post"
    corpus = load_corpus(n=args.n, seed=0)
    print(
        f"vectors: {what} (coeff {coeff}); corpus: {len(corpus)} texts x {args.tokens} tokens; "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    res = activation_difference_lens(
        lm,
        corpus,
        vectors=vs,
        coeff=coeff,
        hooks=args.hooks,
        first_k=args.first_k,
        max_tokens=args.tokens,
        batch_size=args.batch_size,
    )
    t_lens, c_lens = time.perf_counter() - t0, time.process_time() - c0
    ro = res.read(lm, k=20)
    t_all = time.perf_counter() - t0
    paths = save_lens(args.out, res, ro, lm)
    strict, loose = ro.find(OWL_STRICT, 20), ro.find(OWL_LOOSE, 20)

    def where(hits: list[dict]) -> dict:
        out: dict[str, list[str]] = {}
        for h in hits:
            out.setdefault(h["hook"], [])
            if h["position"] not in out[h["hook"]]:
                out[h["hook"]].append(h["position"])
        return out

    summary = {
        "vectors": what,
        "coeff": coeff,
        "n_texts": res.n_texts,
        "n_tokens": res.n_tokens,
        "lens_seconds": round(t_lens, 1),
        "lens_cpu_seconds": round(c_lens, 1),
        "cpu_seconds_over_threads": round(c_lens / torch.get_num_threads(), 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "lens_plus_readout_seconds": round(t_all, 1),
        "tokens_per_second_both_runs": round(2 * res.n_tokens / t_lens, 1),
        "first_owl_hit": strict[0] if strict else None,
        "owl_hits_by_hook": where(strict),
        "first_owl_related_hit": loose[0] if loose else None,
        "logits_top10": {r.position: [t.token for t in r.top[:10]] for r in ro.logits},
        "hook24_top10": {
            r.position: [t.token for t in r.top[:10]]
            for r in ro.rows
            if r.hook == "blocks.24.hook_resid_post"
        },
        "hook29_top10": {
            r.position: [t.token for t in r.top[:10]]
            for r in ro.rows
            if r.hook == "blocks.29.hook_resid_post"
        },
        "outputs": {k: str(v) for k, v in paths.items()},
    }
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    first = strict[0] if strict else None
    print(
        f"ACCEPTANCE lens on {res.n_texts} texts x {args.tokens} tokens: {t_lens:.1f}s "
        f"wall (CPU {c_lens:.0f}s over {torch.get_num_threads()} threads = {c_lens / torch.get_num_threads():.0f}s "
        f"of 2 cores; load {os.getloadavg()[0]:.1f}) (< 300 s needed); first 'owl' token in a top 20: "
        + (
            f"{first['hook']} position {first['position']} rank {first['rank']} ({first['token']!r})"
            if first
            else "none"
        )
    )


if __name__ == "__main__":
    main()
