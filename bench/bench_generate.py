"""Sampler speed: our `sample()` (shared prefix on / off) vs `model.generate` vs a forward pass,
in float32 and bfloat16, on the embedded model.

All of it runs in one process on the same number-task chat prompts (by default the owl
prompt teacher's: system prompt + user prompt, as `steerdiff generate --teacher prompt`
writes them), at the same batch and number of new tokens (no early stop: every row
generates exactly --new tokens), interleaved for --repeats rounds; the best round of each
is reported (the CPU is shared, so the best round is the least disturbed one), in wall
seconds and in CPU seconds of this process (with --threads 1, CPU time leaves out the time
other jobs held the core: the steadier figure on a shared machine).

    python bench/bench_generate.py [--batch 32] [--new 48] [--repeats 2] [--teacher plain]

Figures, per dtype:
- new tok/s: generated tokens / time including the prefill (ours and generate);
- sequence tok/s: (real prompt + generated tokens of every row) / time; the forward
  pass reports the same quantity for the same sequences teacher forced, which bounds
  generation without sharing (with sharing the prefix is run once, so it can pass it);
- FLOP/s: the FLOPs each method executes per CPU second, as a fraction of the same for a
  2048^3 matmul measured in the same rounds and dtype (best of them). FLOPs counted as
  executed, pads included (a left-padded batch computes them): 2 x (matmul weights of the
  decoder blocks) per token run + 2 x d_model x vocab per position whose logits are
  computed (all positions teacher forced; the last one per row in a prefill and per
  decode step) + 2 x 2 x (n_heads x head_dim) per (query, key) pair per layer, causal
  (the j-th token of a pass after c cached ones attends to c + j keys). Norms, rotary,
  softmax and sampling are left out (< 1%). Our sampler runs the shared prefix once;
- work bound: generate's FLOPs / ours, the speed-up ours would have if both ran at the
  same FLOP/s (the profile shows both matmul-bound);
- greedy check: rows token-identical to model.generate on the same batch, and, as the
  noise floor of the dtype, model.generate in batches of 8 vs in one batch.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
from transformers import GenerationConfig

from steerdiff.generate import SampleStats, sample
from steerdiff.generate.prefix import common_prefix_len
from steerdiff.hooks import get_blocks
from steerdiff.models import load_model
from steerdiff.tasks.numbers import make_prompts
from steerdiff.teachers import build_teacher


class Flops:
    """FLOP counts of the embedded model's passes on real tokens (see the module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        blocks = get_blocks(model)
        self.block = sum(p.numel() for p in blocks.parameters() if p.dim() == 2)  # all blocks
        self.head = cfg.hidden_size * cfg.vocab_size
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.attn = 4 * cfg.num_attention_heads * head_dim * len(blocks)  # per (q, k) pair

    def run(self, rows: int, width: int, cached: int, logits: int) -> float:
        """One forward of [rows, width] tokens after `cached` ones; logits per row."""
        pairs = rows * (width * cached + width * (width + 1) // 2)
        return 2 * self.block * rows * width + 2 * self.head * rows * logits + self.attn * pairs

    def teacher_forced(self, rows: int, width: int) -> float:
        return self.run(rows, width, 0, width)

    def generation(self, rows: int, plen: int, new: int, shared: int = 0) -> float:
        """Prefill (the shared prefix once, then the padded rests) + new - 1 decode steps."""
        f = self.run(1, shared, 0, 1) if shared else 0.0
        f += self.run(rows, plen - shared, shared, 1)
        for t in range(1, new):  # the step feeding token t-1 attends to plen + t keys
            f += self.run(rows, 1, plen + t - 1, 1)
        return f


def matmul_peak(dtype: torch.dtype, n: int = 2048, tries: int = 3) -> float:
    """FLOPs per CPU second of the best of `tries` n x n x n matmuls in this dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b)[1] for _ in range(tries))
    return 2 * n**3 / best


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    plen = max(map(len, prompts))
    ids = torch.full((len(prompts), plen), pad)
    am = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, plen - len(p) :] = torch.tensor(p)
        am[r, plen - len(p) :] = 1
    return ids, am


def bench_dtype(dtype: str, prompts_of, args) -> dict:
    lm = load_model(dtype=dtype)
    tok, model = lm.tokenizer, lm.model
    prompts = prompts_of(lm)
    B, N, pad = len(prompts), args.new, tok.pad_token_id
    ids, am = left_padded(prompts, pad)
    plen = ids.shape[1]
    full = torch.cat([ids, torch.randint(100, 1000, (B, N))], dim=1)  # [B, plen + N]
    full_am = torch.cat([am, torch.ones(B, N, dtype=am.dtype)], dim=1)
    gen_kw = dict(max_new_tokens=N, min_new_tokens=N, pad_token_id=pad, eos_token_id=None)
    gcfg = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, **gen_kw)

    def ours(share: bool, new: int = N) -> Callable[[], None]:
        def run() -> None:
            st = SampleStats()
            res = sample(lm, prompts, new, stop_ids=[], batch_size=B, stats=st, share_prefix=share)
            assert all(len(s.token_ids) == new for s in res)
            assert (st.shared_tokens > 0) == share

        return run

    def generate() -> None:
        torch.manual_seed(0)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=am, generation_config=gcfg)
        assert out.shape == (B, plen + N)

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=full, attention_mask=full_am)

    sample(lm, prompts[:2], max_new_tokens=2, stop_ids=[])  # warm-up
    runs = {"ours": ours(True), "ours, no sharing": ours(False), "generate": generate}
    runs["forward"] = forward
    runs["ours, prefill only"] = ours(True, 1)  # 1 new token: the prefill and one draw
    best = {name: [float("inf"), float("inf")] for name in runs}  # wall, cpu
    peak = 0.0
    for _ in range(args.repeats):
        peak = max(peak, matmul_peak(model.dtype))
        for name, fn in runs.items():
            best[name] = [min(a, b) for a, b in zip(best[name], _timed(fn), strict=True)]
    # greedy: ours (both ways) vs model.generate on the same batch
    with torch.inference_mode():
        hf = model.generate(input_ids=ids, attention_mask=am, do_sample=False, **gen_kw)
    hf_rows = hf[:, plen:].tolist()
    same = {}
    for share in (True, False):
        res = sample(lm, prompts, N, temperature=0, stop_ids=[], batch_size=B, share_prefix=share)
        same[share] = sum(s.token_ids == h for s, h in zip(res, hf_rows, strict=True))
    same["generate, batches of 8"] = 0
    for i in range(0, B, 8):  # the same prompts, 8 at a time (less padding)
        part = prompts[i : i + 8]
        pids, pam = left_padded(part, pad)
        with torch.inference_mode():
            g = model.generate(input_ids=pids, attention_mask=pam, do_sample=False, **gen_kw)
        rows = g[:, pids.shape[1] :].tolist()
        same["generate, batches of 8"] += sum(
            a == b for a, b in zip(rows, hf_rows[i : i + 8], strict=True)
        )
    lengths = [len(p) for p in prompts]
    shared = common_prefix_len(prompts)
    fl = Flops(model)
    flops = {
        "ours": fl.generation(B, plen, N, shared),
        "ours, no sharing": fl.generation(B, plen, N),
        "generate": fl.generation(B, plen, N),
        "forward": fl.teacher_forced(B, plen + N),
        "ours, prefill only": fl.generation(B, plen, 1, shared),
    }
    return dict(
        best=best, peak=peak, same=same, flops=flops, lengths=lengths, shared=shared, B=B, N=N
    )


def report(dtype: str, r: dict) -> None:
    best, B, N, lengths = r["best"], r["B"], r["N"], r["lengths"]
    seq_tokens = sum(lengths) + B * N
    print(
        f"{dtype}: batch {B}, prompts {min(lengths)}-{max(lengths)} tokens, shared prefix "
        f"{r['shared']} tokens, {N} new tokens; matmul peak {r['peak'] / 1e9:.0f} GFLOP/CPU s"
    )
    print(f"  {'':18s}   wall s    CPU s   new tok/CPU s   seq tok/CPU s   GFLOP/CPU s")
    for name, (wall, cpu) in best.items():
        rate = r["flops"][name] / cpu
        prefill = name == "ours, prefill only"
        toks = "" if name == "forward" or prefill else f"{B * N / cpu:.1f}"
        seq = "" if prefill else f"{seq_tokens / cpu:.1f}"
        print(
            f"  {name:18s} {wall:8.2f} {cpu:8.2f}   {toks:>13s}   {seq:>13s}   "
            f"{rate / 1e9:6.1f} = {rate / r['peak']:5.1%} of peak"
        )
    dec_s = best["ours"][1] - best["ours, prefill only"][1]
    dec = (r["flops"]["ours"] - r["flops"]["ours, prefill only"]) / dec_s
    print(
        f"  ours, the {N - 1} decode steps (difference of the two): {dec_s:.2f} CPU s, "
        f"{dec / 1e9:.1f} GFLOP/CPU s = {dec / r['peak']:5.1%} of peak"
    )

    def ratio(a: str, b: str) -> str:
        return f"{best[b][0] / best[a][0]:5.2f}x wall, {best[b][1] / best[a][1]:5.2f}x CPU"

    print(f"  ours / generate (new tok/s):         {ratio('ours', 'generate')}   (target >= 2x)")
    print(f"  ours, no sharing / generate:         {ratio('ours, no sharing', 'generate')}")
    bound = r["flops"]["generate"] / r["flops"]["ours"]
    print(f"  work bound (generate FLOPs / ours):  {bound:5.2f}x")
    print(f"  ours / forward (sequence tok/s):     {ratio('ours', 'forward')}")
    same = r["same"]
    print(
        f"  greedy, rows token-identical to model.generate (batch {B}): {same[True]}/{B} ours, "
        f"{same[False]}/{B} ours without sharing, {same['generate, batches of 8']}/{B} "
        "model.generate itself in batches of 8 (the dtype's noise floor)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--teacher", default="prompt", choices=["prompt", "plain"])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = {"kind": "prompt", "animal": "owl"} if args.teacher == "prompt" else {"kind": "plain"}
    users = make_prompts(args.batch)

    def prompts_of(lm) -> list[list[int]]:
        teacher = build_teacher(spec, lm)
        return [teacher.prompt_ids(u) for u in users]

    load0 = os.getloadavg()
    print(
        f"embedded SmolLM2-135M, {args.teacher} teacher's number prompts, "
        f"{torch.get_num_threads()} threads, best of {args.repeats} interleaved rounds"
    )
    for dtype in args.dtypes.split(","):
        report(dtype, bench_dtype(dtype, prompts_of, args))
    load1 = os.getloadavg()
    print(f"load average: {load0[0]:.1f} at start, {load1[0]:.1f} at end ({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
