"""Sampler speed on the embedded model: our `sample()` vs `model.generate` vs a forward pass.

All three run in one process on the same number-task chat prompts, at the same batch
size and number of new tokens (no early stop: every row generates exactly --new
tokens), interleaved for --repeats rounds; the best round of each is reported
(the CPU is shared, so the best round is the least disturbed one).

    python bench/bench_generate.py [--batch 32] [--new 48] [--repeats 2]

Figures:
- new tok/s: generated tokens / wall time including the prefill (ours and generate);
- processed tok/s: (prompt + generated tokens) / wall time, the same quantity the
  teacher-forced forward pass reports for the same [batch, prompt + new] sequences,
  which is the upper bound for generation on the same hardware.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import GenerationConfig

from steerdiff.chat import chat_prompt_ids
from steerdiff.generate import SampleStats, sample
from steerdiff.models import load_model
from steerdiff.tasks.numbers import make_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    lm = load_model()
    tok, model = lm.tokenizer, lm.model
    B, N = args.batch, args.new
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": u}]) for u in make_prompts(B)]
    plen = max(map(len, prompts))
    prompt_tokens = sum(map(len, prompts))
    # left-padded batch for model.generate and the forward pass
    ids = torch.full((B, plen), tok.pad_token_id)
    am = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, plen - len(p) :] = torch.tensor(p)
        am[r, plen - len(p) :] = 1
    gcfg = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=N,
        min_new_tokens=N,
        pad_token_id=tok.pad_token_id,
        eos_token_id=None,
    )
    full = torch.cat([ids, torch.randint(100, 1000, (B, N))], dim=1)  # [B, plen + N]
    full_am = torch.cat([am, torch.ones(B, N, dtype=am.dtype)], dim=1)

    def run_ours() -> float:
        st = SampleStats()
        t = time.perf_counter()
        res = sample(lm, prompts, max_new_tokens=N, stop_ids=[], batch_size=B, seed=0, stats=st)
        dt = time.perf_counter() - t
        assert all(len(s.token_ids) == N for s in res)
        return dt

    def run_generate() -> float:
        torch.manual_seed(0)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=am, generation_config=gcfg)
        dt = time.perf_counter() - t
        assert out.shape == (B, plen + N)
        return dt

    def run_forward() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=full, attention_mask=full_am)
        return time.perf_counter() - t

    sample(lm, prompts[:2], max_new_tokens=2, stop_ids=[])  # warm-up
    best = {"ours": float("inf"), "generate": float("inf"), "forward": float("inf")}
    for _ in range(args.repeats):
        for name, fn in (("ours", run_ours), ("generate", run_generate), ("forward", run_forward)):
            best[name] = min(best[name], fn())
    new = B * N
    processed_real = prompt_tokens + new
    processed_padded = B * (plen + N)
    ours_new = new / best["ours"]
    gen_new = new / best["generate"]
    fwd = processed_padded / best["forward"]
    ours_proc = processed_padded / best["ours"]
    load1 = os.getloadavg()
    print(
        f"embedded SmolLM2-135M, float32, {torch.get_num_threads()} threads; batch {B}, "
        f"prompt {min(map(len, prompts))}-{plen} tokens, {N} new tokens, best of {args.repeats}"
    )
    print(
        f"  ours (sample):   {best['ours']:7.2f}s  {ours_new:7.1f} new tok/s  "
        f"{ours_proc:7.1f} processed tok/s (padded; {processed_real / best['ours']:.1f} unpadded)"
    )
    print(
        f"  model.generate:  {best['generate']:7.2f}s  {gen_new:7.1f} new tok/s  "
        f"{processed_padded / best['generate']:7.1f} processed tok/s"
    )
    print(
        f"  forward pass:    {best['forward']:7.2f}s  {fwd:7.1f} tok/s ([{B}, {plen + N}] teacher forced)"
    )
    print(f"  ours / generate (new tok/s):          {ours_new / gen_new:5.2f}x   (target >= 4x)")
    print(f"  ours / forward (processed tok/s):     {ours_proc / fwd:5.1%}   (target >= 70%)")
    print(f"  load average: {load0[0]:.1f} at start, {load1[0]:.1f} at end (2 cores, shared)")


if __name__ == "__main__":
    main()
