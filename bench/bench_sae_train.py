"""SAE training on the embedded model: time and quality (issue 15, item 2).

Trains TopK SAEs (8x expansion: 4608 latents, k 32) at blocks.15.hook_resid_post (middle)
and blocks.24.hook_resid_post (late) of SmolLM2-135M-Instruct TOGETHER, from the same
forward passes (the pass stops after block 24), on the default text mix
(tasks.sae_texts: the offline corpus, the packaged chat prompts, 1000 number-task chats),
then evaluates each SAE on held-out texts: explained variance, L0, dead fraction (latents
that never fired on the evaluation tokens), CE clean / spliced / zero-ablated and CE
recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean), on (a) the run's held-out texts
of the whole mix (metrics.json) and (b) the held-out corpus texts among them.

The default budget, 600,000 training tokens per hook, is chosen from throughputs measured
on this 2-core machine while idle (float32): the forward pass to block 24 at ~1,090
tokens/s, an SAE step (4096 tokens, 4608 latents, k 32, Adam) at ~7,300 tokens/s per SAE.
So ~9.5 min of activations (617k tokens run: the shuffle buffer drops a remainder), ~2.7
min of SAE steps (two SAEs), ~1.7 min of evaluation (clean + spliced + zero-ablated passes,
8,192 tokens, twice) and loading: ~14 minutes, under the 20-minute target with margin.
Timings on a machine shared with other jobs are inflated.

Usage: python bench/bench_sae_train.py [--quick] [--out runs/sae-bench] [--tokens N] [--k K]
Writes bench/results/sae_train.json (sae_train_quick.json with --quick); the SAE folders
(~20 MB each) go to --out (runs/ is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
HOOKS = ["blocks.15.hook_resid_post", "blocks.24.hook_resid_post"]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run (smoke check)")
    ap.add_argument("--out", default=None, help="run folder (default runs/sae-bench[-quick])")
    ap.add_argument("--tokens", type=int, default=None, help="training tokens per hook")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--overwrite", action="store_true", help="start again in --out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from steerdiff.fit.sae_metrics import evaluate_saes
    from steerdiff.fit.sae_train import SAETrainConfig, split_texts, train_saes
    from steerdiff.interpret.corpus import load_corpus
    from steerdiff.models import load_model
    from steerdiff.tasks.sae_texts import sae_texts

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    quick = args.quick
    out = Path(args.out or ("runs/sae-bench-quick" if quick else "runs/sae-bench"))
    tokens = args.tokens or (32_768 if quick else 600_000)
    cfg = SAETrainConfig(
        hooks=HOOKS, k=args.k, tokens=tokens,
        buffer_tokens=16_384 if quick else 65_536,
        eval_tokens=2048 if quick else 8192,
        n_numbers=100 if quick else 1000,
    )  # fmt: skip
    lm = load_model()
    dtype = str(next(lm.model.parameters()).dtype).replace("torch.", "")
    texts = sae_texts(lm.tokenizer, cfg.corpus, cfg.n_corpus, cfg.n_chat, cfg.n_numbers, cfg.seed)
    t_setup = time.perf_counter() - t_start
    say(f"{len(texts)} texts, {tokens} tokens per hook, hooks {', '.join(HOOKS)}, {dtype}")
    saes = train_saes(lm, cfg, out, texts=texts, overwrite=args.overwrite)
    t_train = time.perf_counter() - t_start - t_setup
    metrics = json.loads((out / "metrics.json").read_text())

    corpus = set(load_corpus(cfg.corpus).texts)
    held = [t for t in split_texts(texts, cfg.eval_texts, cfg.seed)[1] if t in corpus]
    t0 = time.perf_counter()
    on_corpus = evaluate_saes(lm, list(saes.values()), held, cfg.max_len, cfg.eval_tokens)
    t_corpus_eval = time.perf_counter() - t0
    wall = metrics["wall_seconds"]
    result = {
        "quick": quick,
        "model": lm.spec,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "hooks": HOOKS,
        "tokens_per_hook": metrics["tokens"],
        "settings": {k: v for k, v in metrics["settings"].items() if k != "texts_sha256"},
        "n_texts": len(texts),
        "wall_seconds": {
            "total": time.perf_counter() - t_start,
            "setup (model load, text mix)": t_setup,
            "train_saes (activations + SAE steps + its eval)": t_train,
            "activations": wall["activations"],
            "sae_steps": wall["sae_steps"],
            "eval_held_out_mix": wall["eval"],
            "eval_held_out_corpus": t_corpus_eval,
        },
        "throughput_tokens_per_s": {
            "activations (forward to block 24)": metrics["tokens"] / wall["activations"],
            "sae_steps (both SAEs)": metrics["tokens"] / wall["sae_steps"],
        },
        "eval_held_out_mix": metrics["hooks"],
        "eval_held_out_corpus": on_corpus,
        "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
        "note": "timings on a shared machine are inflated; dead = never fired on the eval tokens",
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("sae_train_quick.json" if quick else "sae_train.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    for name, table in (("held-out mix", metrics["hooks"]), ("held-out corpus", on_corpus)):
        say(f"-- {name}")
        for h, m in table.items():
            say(
                f"{h}: EV {m['explained_variance']:.3f}  L0 {m['l0']:.1f}  dead "
                f"{m['dead_fraction']:.3f}  CE clean {m['ce_clean']:.3f} spliced "
                f"{m['ce_spliced']:.3f} zero {m['ce_zero_ablated']:.3f}  recovered "
                f"{m['ce_recovered']:.3f}  ({m['n_tokens']} tokens)"
            )
    say(json.dumps(result["wall_seconds"], indent=1))
    say(json.dumps(result["throughput_tokens_per_s"], indent=1))
    say(f"wrote {path}")


if __name__ == "__main__":
    main()
