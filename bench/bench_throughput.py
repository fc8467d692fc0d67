"""Throughput to the limit: achieved FLOP/s of each stage as a fraction of the matmul peak.

For each dtype (float32, bfloat16), in the same run, on the embedded SmolLM2-135M:

- peak:     the best GFLOP/s of a large matmul in that dtype (2048x576 @ 576x1536, the
            shape of an MLP projection over a batch, and 2048^3);
- forward:  teacher-forced HF forward of [batch, ~100] number-task chat prompts (logits at
            every position);
- prefill:  `sample(..., max_new_tokens=1)`: the sampler's prefill and one token;
- sampler:  `steerdiff.generate.sample`, greedy, --new tokens per row, no early stop (its
            time comes from the decode stage's runs, which time the whole call too);
- decode:   the same sampler call, timed from its first one-token forward to its end;
- generate: `model.generate`, greedy, the same prompts, batch and length;
- fit:      `steerdiff.fit` steps (forward + backward, weights frozen), SFT, timed over the
            second epoch (the prefix cache is then filled): one vector at
            blocks.24.hook_resid_post (blocks 24-29 run), and q/k/v vectors at every layer
            (all 30 blocks run).

FLOPs are counted with bench/_flops.py (its docstring says what is counted), checked here
against torch.utils.flop_counter.FlopCounterMode on one run of each stage. GFLOP/s = those
FLOPs / best wall time of --rounds interleaved rounds (the 2 cores are shared: the best round
is the least disturbed; ratios within one run are what counts). Fraction of peak = GFLOP/s /
the peak in the same dtype. Then each stage is profiled once (torch.profiler, self CPU time
per op) and one line says where its time goes.

    python bench/bench_throughput.py [--quick] [--dtypes float32,bfloat16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import collections
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from _flops import (
    ModelShape,
    counted_flops,
    decode_flops,
    fit_epoch_flops,
    prefill_flops,
    prefix_flops,
    sampler_flops,
    teacher_forced_flops,
)
from _profile import Mark, bandwidth_gbs, decode_roofline, diagnosis, profile_run
from bench_fit import rows as fit_rows
from transformers import GenerationConfig

from steerdiff.chat import chat_prompt_ids
from steerdiff.fit import Example, FitConfig, fit, tokenize_rows
from steerdiff.generate import sample
from steerdiff.models import LoadedModel, load_model
from steerdiff.tasks.numbers import make_prompts

FITS = {  # stage -> (hook patterns, first block run, how far the gradient goes into it)
    "fit resid_post 24": (["blocks.24.hook_resid_post"], 24, "none"),
    "fit q/k/v all layers": (["blocks.*.attn.hook_{q,k,v}"], 0, "attention"),
}


@dataclass
class Stage:
    """One timed stage in one dtype: what it computes and how long it took at best."""

    name: str
    dtype: str
    flops: int  # of the timed part
    matmul_flops: int  # of which in matmul kernels (all but the attention term)
    tokens: int  # what tokens/s counts (see the table's note)
    run: Callable[[Mark], Any] | None = None
    seconds: float = float("inf")


def whole(fn: Callable[[], Any]) -> Callable[[Mark], Any]:
    """A run whose timed part is all of fn."""

    def run(mark: Mark) -> None:
        mark()
        fn()

    return run


# ----------------------------------------------------------------------------- inputs


def padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded [b, max len] ids and attention mask."""
    plen = max(map(len, prompts))
    ids = torch.full((len(prompts), plen), pad)
    am = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, plen - len(p) :] = torch.tensor(p)
        am[r, plen - len(p) :] = 1
    return ids, am


def equal_length_examples(lm: LoadedModel, n: int) -> list[Example]:
    """n number-task fit rows that all tokenize to the same length (no padding, so the
    FLOPs of every batch are known from the counts alone, whatever the fit's batch order)."""
    exs = tokenize_rows(lm.tokenizer, fit_rows(40 * n, seed=1))
    common = collections.Counter(map(len, exs)).most_common(1)[0][0]
    same = [e for e in exs if len(e) == common][:n]
    if len(same) < n:
        raise SystemExit(f"only {len(same)} rows of length {common}; lower --fit-rows")
    return same


def epoch_batches(exs: list[Example], batch: int) -> list[tuple[int, int, int]]:
    """(rows, seq, loss tokens) of each step of an epoch (all rows have one length)."""
    chunks = [exs[i : i + batch] for i in range(0, len(exs), batch)]
    return [(len(c), len(c[0]), sum(len(e.completion_ids) for e in c)) for c in chunks]


# ----------------------------------------------------------------------------- stages


def peak_stages(dtype: str, quick: bool) -> list[Stage]:
    """One matmul per shape; each run times `reps` of them and keeps the fastest."""
    shapes = [(2048, 576, 1536)] + ([] if quick else [(2048, 2048, 2048)])
    reps = 2 if quick else 5
    out = []
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=getattr(torch, dtype))
        b = torch.randn(k, n, dtype=getattr(torch, dtype))

        def mm(mark: Mark, a: torch.Tensor = a, b: torch.Tensor = b) -> float:
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                torch.mm(a, b)
                best = min(best, time.perf_counter() - t0)
            mark()
            return best

        f = 2 * m * k * n
        out.append(Stage(f"matmul {m}x{k}x{n}", dtype, f, f, 0, mm))
    return out


def model_stages(lm: LoadedModel, dtype: str, prompts: list[list[int]], new: int) -> list[Stage]:
    model, tok = lm.model, lm.tokenizer
    shape = ModelShape.of(model)
    mm = replace(shape, d_attn=0)  # the same counts without the attention term
    ids, am = padded(prompts, tok.pad_token_id)
    b, plen = ids.shape
    gcfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=new,
        min_new_tokens=new,
        pad_token_id=tok.pad_token_id,
        eos_token_id=None,
    )

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=am)

    def generate() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=am, generation_config=gcfg)

    def prefill() -> None:
        sample(
            lm,
            prompts,
            max_new_tokens=1,
            temperature=0,
            stop_ids=[],
            batch_size=b,
            share_prefix=False,
        )

    def counts(f: Callable[..., int], *a: int) -> tuple[int, int]:
        return f(shape, *a), f(mm, *a)

    sampler = Stage("sampler", dtype, *counts(sampler_flops, b, plen, new), b * new)

    def run_decode(mark: Mark) -> None:
        """The sampler, marked at its first forward of one token per row (the first decode
        step); the whole call's time goes to the sampler stage (it has no run of its own)."""
        marked: list[bool] = []
        t0 = time.perf_counter()

        def pre_hook(_module: Any, _args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids")
            if not marked and ids is not None and ids.shape[1] == 1:
                marked.append(True)
                mark()

        handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            sample(
                lm,
                prompts,
                max_new_tokens=new,
                temperature=0,
                stop_ids=[],
                batch_size=b,
                share_prefix=False,
            )
        finally:
            handle.remove()
        sampler.seconds = min(sampler.seconds, time.perf_counter() - t0)

    return [
        Stage("forward", dtype, *counts(teacher_forced_flops, b, plen), b * plen, whole(forward)),
        Stage("prefill", dtype, *counts(prefill_flops, b, plen), b * plen, whole(prefill)),
        sampler,
        Stage("decode", dtype, *counts(decode_flops, b, plen, new), b * (new - 1), run_decode),
        Stage(
            "model.generate", dtype, *counts(sampler_flops, b, plen, new), b * new, whole(generate)
        ),
    ]


def fit_config(hooks: list[str], batch: int, epochs: int) -> FitConfig:
    return FitConfig(
        hooks=hooks,
        objective="sft",
        lr=1e-2,
        schedule="constant",
        warmup_steps=0,
        epochs=epochs,
        batch_size=batch,
        val_size=0,
        cache_prefix=True,
        progress=False,
        checkpoint_every=10**9,
    )


def fit_stages(lm: LoadedModel, dtype: str, exs: list[Example], batch: int) -> list[Stage]:
    """Each run fits 2 epochs; the timed part is the second (the prefix cache is full)."""
    shape = ModelShape.of(lm.model)
    steps = epoch_batches(exs, batch)
    out = []
    for name, (hooks, start, grad) in FITS.items():

        def run(mark: Mark, hooks: list[str] = hooks) -> None:
            def on_step(step: int, _row: dict) -> None:
                if step == len(steps):  # the last step of the first epoch is done
                    mark()

            fit(lm, exs, fit_config(hooks, batch, 2), on_step=on_step)

        f = fit_epoch_flops(shape, steps, start, grad)  # type: ignore[arg-type]
        f_mm = fit_epoch_flops(replace(shape, d_attn=0), steps, start, grad)  # type: ignore[arg-type]
        out.append(Stage(name, dtype, f, f_mm, len(exs) * len(exs[0]), run))
    return out


def time_stage(st: Stage) -> None:
    """Run once; keep the best seconds of the timed part (or of what the run returns)."""
    t: list[float] = []
    assert st.run is not None
    res = st.run(lambda: t.append(time.perf_counter()))
    st.seconds = min(st.seconds, res if isinstance(res, float) else time.perf_counter() - t[0])


# ----------------------------------------------------------------------------- FLOP check


def flop_check(
    lm: LoadedModel, prompts: list[list[int]], new: int, exs: list[Example], batch: int
) -> None:
    """Our counts vs FlopCounterMode on a forward, a sampler call and a one-epoch fit."""
    shape = ModelShape.of(lm.model)
    pad = lm.tokenizer.pad_token_id
    ids, am = padded(prompts, pad)
    b, plen = ids.shape
    short = min(map(len, prompts))
    ids_u, am_u = padded([p[-short:] for p in prompts], pad)  # one length: causal kernel

    def fwd(i: torch.Tensor, a: torch.Tensor) -> Callable[[], Any]:
        def go() -> None:
            with torch.inference_mode():
                lm.model(input_ids=i, attention_mask=a)

        return go

    def run_sample() -> None:
        sample(
            lm,
            prompts,
            max_new_tokens=new,
            temperature=0,
            stop_ids=[],
            batch_size=b,
            share_prefix=False,
        )

    cases: list[tuple[str, int, Callable[[], Any]]] = [
        ("forward, padded (masked kernel)", teacher_forced_flops(shape, b, plen), fwd(ids, am)),
        (
            "forward, one length (causal kernel)",
            teacher_forced_flops(shape, b, short),
            fwd(ids_u, am_u),
        ),
        ("sampler", sampler_flops(shape, b, plen, new), run_sample),
    ]
    steps = epoch_batches(exs, batch)
    for name, (hooks, start, grad) in FITS.items():
        ours = fit_epoch_flops(shape, steps, start, grad)  # type: ignore[arg-type]
        ours += sum(prefix_flops(shape, rows, seq, start) for rows, seq, _ in steps)
        cfg = fit_config(hooks, batch, 1)
        cases.append((f"{name}: 1 epoch + prefix", ours, lambda cfg=cfg: fit(lm, exs, cfg)))
    print("FLOP count check, ours vs torch.utils.flop_counter.FlopCounterMode (same inputs):")
    for name, ours, fn in cases:
        counted, per_op = counted_flops(fn)
        attn = sum(v for k, v in per_op.items() if "attention" in k)
        print(
            f"  {name:38s} ours {ours / 1e9:8.1f} GFLOP, counted {counted / 1e9:8.1f} "
            f"(attention kernels {attn / 1e9:5.1f}): ours/counted {ours / counted:.3f}"
        )
    print(
        "  (a masked attention kernel computes the whole s x s square; ours counts the causal "
        "half, the useful work)"
    )


# ----------------------------------------------------------------------------- main


def build_stages(dt: str, lm: LoadedModel, prompts: list, exs: list, args: Any) -> list[Stage]:
    stages = (
        peak_stages(dt, args.quick)
        + model_stages(lm, dt, prompts, args.new)
        + fit_stages(lm, dt, exs, args.fit_batch)
    )
    for st in stages:  # warm-up (oneDNN makes its kernels on first use of a shape)
        if st.name.startswith(("matmul", "forward")):
            time_stage(st)
            st.seconds = float("inf")
    return stages


def print_table(stages: dict[str, list[Stage]], peak: dict[str, float]) -> None:
    print("\n| stage | dtype | tokens/s | GFLOP/s | peak GFLOP/s | fraction of peak |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dt, sts in stages.items():
        for st in sts:
            g = st.flops / st.seconds / 1e9
            tps = f"{st.tokens / st.seconds:.1f}" if st.tokens else "-"
            print(f"| {st.name} | {dt} | {tps} | {g:.1f} | {peak[dt]:.1f} | {g / peak[dt]:.1%} |")
    print(
        "tokens/s: forward and prefill = prompt tokens incl. left padding; sampler and "
        "model.generate = new tokens (their time includes the prefill); decode = tokens of the "
        "one-token steps; fit = training tokens (prompt + completion) per second of epoch 2"
    )
    if "float32" in stages and "bfloat16" in stages:
        print("\nbfloat16 / float32 speed (same run):")
        for a, b in zip(stages["float32"], stages["bfloat16"], strict=True):
            print(f"  {a.name:22s} {a.seconds / b.seconds:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes, 1 round, to try it")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--fit-rows", type=int, default=32)
    ap.add_argument("--fit-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.batch, args.new, args.fit_rows, args.fit_batch = 1, 8, 8, 8, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtypes.split(",")
    cpu = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in cpu]
    load0 = os.getloadavg()
    lms = {dt: load_model("default", dtype=dt) for dt in dtypes}
    lm0 = lms[dtypes[0]]
    shape = ModelShape.of(lm0.model)
    tok = lm0.tokenizer
    users = make_prompts(args.batch)
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": u}]) for u in users]
    exs = equal_length_examples(lm0, args.fit_rows)
    plen = max(map(len, prompts))
    print(
        f"embedded SmolLM2-135M ({shape.n_layers} blocks of {shape.block_params / 1e6:.2f}M "
        f"matmul weights, lm_head {shape.head_params / 1e6:.1f}M); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; CPU flags: {' '.join(isa) or 'no avx512/amx'}"
    )
    print(
        f"forward/sampler: batch {args.batch}, prompts {min(map(len, prompts))}-{plen} tokens "
        f"(left-padded to {plen}), {args.new} new tokens (greedy, no early stop); fit: "
        f"{args.fit_rows} rows x {len(exs[0])} tokens, batch {args.fit_batch}, SFT; "
        f"best of {args.rounds} rounds"
    )
    sample(lm0, prompts[:2], max_new_tokens=2, stop_ids=[])  # warm-up
    flop_check(lm0, prompts, args.new, exs, args.fit_batch)

    stages = {dt: build_stages(dt, lms[dt], prompts, exs, args) for dt in dtypes}
    for r in range(args.rounds):
        for dt in dtypes:
            for st in stages[dt]:
                if st.run is not None:
                    time_stage(st)
        print(f"  round {r + 1}/{args.rounds} done {time.strftime('%H:%M:%S')}", flush=True)
    peak = {}
    for dt in dtypes:
        peak[dt] = max(s.flops / s.seconds for s in stages[dt] if s.name.startswith("matmul")) / 1e9
    print_table(stages, peak)
    load1 = os.getloadavg()
    print(f"load average: {load0[0]:.1f} at start, {load1[0]:.1f} after timing (2 cores, shared)")
    if args.no_profile:
        return
    bw = bandwidth_gbs()
    print(
        f"\nwhere the time goes (torch.profiler, self CPU time per op, one profiled run; "
        f"memory copy bandwidth {bw:.1f} GB/s):"
    )
    for dt in dtypes:
        by = {s.name: s for s in stages[dt] if not s.name.startswith("matmul")}
        profs = {n: profile_run(s.run) for n, s in by.items() if s.run is not None}
        for name, st in by.items():
            if name in profs:
                print(diagnosis(f"{name} {dt}", profs[name], st.matmul_flops, peak[dt]))
        step = by["decode"].flops / max(args.new - 1, 1)
        print(decode_roofline(shape, dt, args.batch, plen + args.new // 2, step, bw, peak[dt]))


if __name__ == "__main__":
    main()
