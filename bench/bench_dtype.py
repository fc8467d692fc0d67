"""float32 vs bfloat16 on the embedded SmolLM2-135M-Instruct, everything measured in one
run, with what dtype="auto" picks on this machine (dtypes.pick_dtype) printed first:

0. a 1024x576 by 576x1536 matmul (the MLP's shape at 16 x 64 tokens) in each dtype,
   GFLOP/s wall and per CPU-second (best of 10; the two dtypes interleaved);
1. next-token distributions on the offline corpus (--texts texts x --tokens tokens):
   KL(float32 || bfloat16) per token (mean, p50, p99, max), top-1 agreement, and the forward
   pass's speed on the same batches (tokens/s, best of --rounds rounds per batch, the two
   dtypes interleaved batch by batch; CPU-seconds too, as the 2 cores are shared);
2. the demo (data/demo.toml, through the pipeline's Python API) once per dtype into two
   run folders: owl share with its 95% CI for base / steered teacher / prompt teacher /
   vector student / q/k/v student, gap closed of both fits (CE and top-k KL, with CIs),
   planted cosine, how many teacher rows the two dtypes wrote identically, wall and CPU
   time; a figure whose bfloat16 value lies outside the float32 CI (or the reverse) is
   flagged;
3. a planted-vector fit in both dtypes (teacher = model + v* at blocks.20, distillation,
   as bench_planted.py --embedded): each dtype end to end on its own teacher samples, and
   bfloat16 fitted on float32's samples (the fit's numerics alone); cosine(fitted, v*) in each
   and between the fitted vectors.

    python bench/bench_dtype.py [--quick] [--skip-kl] [--skip-demo] [--skip-planted]
                                [--runs-dir DIR] [--threads 1]

--threads 1 (the default): on the shared 2-core machine two threads spin-wait for each
other (the CPU-seconds then count waiting); one thread gives steadier figures.
--quick: 40 texts, a demo at 32 prompts / 5 questions, a planted fit on 48 rows (minutes;
figures not meaningful, for trying the script). Pipeline progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import tomllib
import torch

from steerdiff.chat import chat_prompt_ids
from steerdiff.dtypes import cpu_flags, dtype_name, pick_dtype
from steerdiff.fit import FitConfig, annotate_topk, planted_experiment, random_vector
from steerdiff.fit.planted import cosine, sample_examples
from steerdiff.interpret.corpus import load_corpus
from steerdiff.io import read_json
from steerdiff.models import LoadedModel, load_model
from steerdiff.pipeline import parse_config, run_experiment
from steerdiff.tasks.numbers import make_prompts

DTYPES = ("float32", "bfloat16")
DTYPES_T = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEMO_ROWS = {  # eval.json name -> what the README calls it
    "base": "base",
    "teacher (steered)": "steered teacher",
    "prompt teacher": "prompt teacher",
    "vector-at-steered-hook-s0": "vector student",
    "qkv-biases-prompted-s0": "q/k/v student",
}


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    return next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "?")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ----------------------------------------------------------------------------- 1. KL, speed


def corpus_batches(lm: LoadedModel, n: int, tokens: int, batch: int) -> list[tuple]:
    texts = load_corpus(n=n, seed=0).texts
    out = []
    for i in range(0, len(texts), batch):
        enc = lm.tokenizer(
            texts[i : i + batch],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=tokens,
            padding_side="right",
        )
        out.append((enc.input_ids, enc.attention_mask))
    return out


def timed_forward(model: torch.nn.Module, ids, mask) -> tuple[torch.Tensor, float, float]:
    c, t = cpu_seconds(), time.perf_counter()
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return logits, time.perf_counter() - t, cpu_seconds() - c


def matmul_peak(rounds: int = 3) -> None:
    m, k, n = 1024, 576, 1536
    wall = {d: 0.0 for d in DTYPES}
    cpu = {d: 0.0 for d in DTYPES}
    for _ in range(rounds):
        for d in DTYPES:
            a, w = torch.randn(m, k, dtype=DTYPES_T[d]), torch.randn(n, k, dtype=DTYPES_T[d])
            torch.nn.functional.linear(a, w)
            for _ in range(10):
                c, t = cpu_seconds(), time.perf_counter()
                torch.nn.functional.linear(a, w)
                dt, dc = time.perf_counter() - t, cpu_seconds() - c
                wall[d] = max(wall[d], 2 * m * k * n / dt / 1e9)
                cpu[d] = max(cpu[d], 2 * m * k * n / max(dc, 1e-9) / 1e9)
    print(f"\n== 0. matmul {m}x{k} by {k}x{n}, best of {10 * rounds} per dtype ==")
    for d in DTYPES:
        print(f"  {d:>8}: {wall[d]:6.0f} GFLOP/s wall, {cpu[d]:6.0f} GFLOP per CPU-second")
    print(
        f"  bfloat16 / float32: {wall['bfloat16'] / wall['float32']:.2f}x wall, "
        f"{cpu['bfloat16'] / cpu['float32']:.2f}x per CPU-second"
    )


def kl_and_speed(models: dict[str, LoadedModel], args) -> None:
    batches = corpus_batches(models["float32"], args.texts, args.tokens, args.batch)
    n_tok = sum(int(m.sum()) for _, m in batches)
    best = {d: [float("inf")] * len(batches) for d in DTYPES}
    cpu = {d: [float("inf")] * len(batches) for d in DTYPES}
    kls, agree = [], 0
    for r in range(args.rounds):
        for i, (ids, mask) in enumerate(batches):
            order = DTYPES if (i + r) % 2 == 0 else DTYPES[::-1]  # interleaved, alternating
            logits = {}
            for d in order:
                logits[d], wall, cs = timed_forward(models[d].model, ids, mask)
                best[d][i], cpu[d][i] = min(best[d][i], wall), min(cpu[d][i], cs)
            if r == 0:
                real = mask.bool()
                lp32 = logits["float32"].float().log_softmax(-1)[real]  # [n, vocab]
                lp16 = logits["bfloat16"].float().log_softmax(-1)[real]
                kls.append((lp32.exp() * (lp32 - lp16)).sum(-1))
                agree += int((lp32.argmax(-1) == lp16.argmax(-1)).sum())
    kl = torch.cat(kls).double()
    q = torch.quantile(kl, torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist()
    print(f"\n== 1. next-token KL(float32 || bfloat16), offline corpus, {len(kl)} tokens ==")
    print(f"texts {args.texts} x up to {args.tokens} tokens, batch {args.batch}")
    print(
        f"KL nats/token: mean {kl.mean():.5f}  p50 {q[0]:.5f}  p99 {q[1]:.5f}  max {kl.max():.4f}"
    )
    print(f"top-1 token agrees on {agree / len(kl):.2%} of tokens")
    tps = {d: n_tok / sum(best[d]) for d in DTYPES}
    cps = {d: n_tok / sum(cpu[d]) for d in DTYPES}
    print(f"forward pass, best of {args.rounds} rounds per batch ({n_tok} tokens per round):")
    for d in DTYPES:
        print(f"  {d:>8}: {tps[d]:8.0f} tokens/s wall, {cps[d]:8.0f} tokens per CPU-second")
    print(
        f"  bfloat16 / float32: {tps['bfloat16'] / tps['float32']:.2f}x tokens/s wall, "
        f"{cps['bfloat16'] / cps['float32']:.2f}x per CPU-second"
    )


# ----------------------------------------------------------------------------- 2. the demo


def demo_raw(quick: bool) -> dict:
    raw = tomllib.loads(Path(str(files("steerdiff").joinpath("data/demo.toml"))).read_text())
    if quick:
        raw["task"] = {**raw["task"], "n_prompts": 32}
        raw["eval"] = {**raw["eval"], "n_questions": 5}
        raw["read"] = {**raw.get("read", {}), "lens_texts": 8}
    return raw


def run_demo(dtype: str, runs_dir: Path, quick: bool) -> dict:
    raw = {**demo_raw(quick), "dtype": dtype}
    cfg = parse_config(raw, f"demo.toml with dtype {dtype}")
    c0, t0 = cpu_seconds(), time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the run's own table and progress
        summary = run_experiment(cfg, runs_dir / dtype)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    stages = list(summary.stages.values())
    fits = {s.tag: read_json(s.path / "result.json") for s in stages if s.kind == "fit"}
    (read,) = [read_json(s.path / "read.json") for s in stages if s.kind == "read"]
    data = {s.tag: s.path / "data.jsonl" for s in stages if s.kind == "data"}
    return {
        "wall": wall,
        "cpu": cpu,
        "cached": [s.name for s in stages if s.cached],
        "shares": {r["name"]: (r["target_rate"], tuple(r["ci95"])) for r in summary.results},
        "fits": fits,
        "planted": read["planted"],
        "data": data,
        "dtype": read_json(stages[0].path / "stage.json")["provenance"]["dtype"],
    }


def outside(x: float, ci) -> bool:
    return ci is not None and not (ci[0] <= x <= ci[1])


def fmt(x: float | None, ci=None, pct: bool = False) -> str:
    if x is None:
        return "-"
    f = (lambda v: f"{100 * v:.2f}%") if pct else (lambda v: f"{v:.3f}")
    return f(x) + (f" ({f(ci[0])} to {f(ci[1])})" if ci else "")


def row(label: str, a, ca, b, cb, pct: bool = False) -> None:
    flag = ""
    if a is not None and b is not None and (outside(b, ca) or outside(a, cb)):
        flag = "  <- outside the other's CI"
    print(f"  {label:<28} {fmt(a, ca, pct):>28} {fmt(b, cb, pct):>28}{flag}")


def same_rows(a: Path, b: Path) -> tuple[int, int]:
    ra = [json.loads(x)["messages"][-1]["content"] for x in a.read_text().splitlines()]
    rb = [json.loads(x)["messages"][-1]["content"] for x in b.read_text().splitlines()]
    return sum(x == y for x, y in zip(ra, rb, strict=False)), max(len(ra), len(rb))


def demo_side_by_side(args) -> None:
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="bench_dtype-"))
    res = {d: run_demo(d, runs, args.quick) for d in DTYPES}
    a, b = res["float32"], res["bfloat16"]
    print(f"\n== 2. the demo in both dtypes (run folders under {runs}) ==")
    print(f"  {'figure':<28} {'float32':>28} {'bfloat16':>28}")
    print("  owl share, 95% CI across questions:")
    for name, label in DEMO_ROWS.items():
        (x, cx), (y, cy) = a["shares"][name], b["shares"][name]
        row(label, x, cx, y, cy, pct=True)
    for tag in a["fits"]:
        fa, fb = a["fits"][tag], b["fits"][tag]
        print(f"  fit {tag} ({fa['objective']}), gap closed on validation:")
        for key, label in (
            ("gap_closed", "CE gap closed"),
            ("kl_gap_closed", "top-k KL gap closed"),
        ):
            row(label, fa.get(key), fa.get(key + "_ci"), fb.get(key), fb.get(key + "_ci"))
        row("CE gap base - teacher", fa["ce_gap"], None, fb["ce_gap"], None)
    for pa, pb in zip(a["planted"], b["planted"], strict=True):
        print(f"  planted check, {pa['fit']} at {pa['hook']}:")
        for key in ("cosine", "norm_ratio", "dla_top20_overlap_centred"):
            row(key, pa[key], None, pb[key], None)
    for tag in a["data"]:
        same, n = same_rows(a["data"][tag], b["data"][tag])
        print(f"  teacher data {tag}: {same} of {n} rows identical in the two dtypes")
    for d in DTYPES:
        cached = f", CACHED stages: {res[d]['cached']}" if res[d]["cached"] else ""
        print(f"  {d:>7}: wall {res[d]['wall']:.0f} s, CPU {res[d]['cpu']:.0f} s{cached}")
    print(
        f"  bfloat16 / float32: {b['wall'] / a['wall']:.2f}x wall time, "
        f"{b['cpu'] / a['cpu']:.2f}x CPU time"
    )


# ----------------------------------------------------------------------------- 3. planted fit


def planted_fits(models: dict[str, LoadedModel], args) -> None:
    hook, norm, max_new, steps, bs = "blocks.20.hook_resid_post", 8.0, 24, args.steps, 32
    tok = models["float32"].tokenizer
    n = args.rows
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": u}]) for u in make_prompts(n)]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    v_star = random_vector(models["float32"], hook, norm, seed=3)
    n_val = max(8, n // 10)
    cfg = FitConfig(
        objective="distill",
        optimizer="adam",
        lr=0.05,
        schedule="constant",
        warmup_steps=0,
        epochs=max(1, -(-steps * bs // (n - n_val))),
        max_steps=steps,
        batch_size=bs,
        val_size=n_val,
        progress=False,
    )
    teacher = {"kind": "steered", "vectors": {hook: v_star}, "coeff": 1.0}
    data, fitted, secs = {}, {}, {}
    for d in DTYPES:
        lm = models[d]
        t0 = time.perf_counter()
        exs = sample_examples(lm, prompts, {hook: v_star}, max_new_tokens=max_new, eos_id=eos)
        annotate_topk(lm, exs, teacher, k=32)
        data[d] = exs
        r = planted_experiment(lm, hook, v_star, [], cfg, examples=exs)
        fitted[d], secs[d] = r, time.perf_counter() - t0
    cross = planted_experiment(models["bfloat16"], hook, v_star, [], cfg, examples=data["float32"])
    same = sum(
        x.completion_ids == y.completion_ids
        for x, y in zip(data["float32"], data["bfloat16"], strict=True)
    )
    print(f"\n== 3. planted vector at {hook}, |v*| = {norm}, distillation, {n} rows ==")
    print(f"{steps} Adam steps of batch {bs}; {same} of {n} teacher samples identical")
    for d in DTYPES:
        r = fitted[d]
        print(
            f"  {d:>8} end to end (its own samples): cosine(fit, v*) {r.cosine:.4f}, "
            f"|fit|/|v*| {r.norm_ratio:.3f}, KL gap closed {fmt(r.fit.extra.get('kl_gap_closed'))}, "
            f"{secs[d]:.0f} s"
        )
    print(
        f"  bfloat16 on float32's samples:       cosine(fit, v*) {cross.cosine:.4f}, "
        f"|fit|/|v*| {cross.norm_ratio:.3f}"
    )
    va, vb = fitted["float32"].v_fitted, fitted["bfloat16"].v_fitted
    print(f"  cosine(float32 fit, bfloat16 fit), each on its own samples: {cosine(va, vb):.4f}")
    print(
        f"  cosine(float32 fit, bfloat16 fit), on the same samples: {cosine(va, cross.v_fitted):.4f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-kl", action="store_true")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--skip-planted", action="store_true")
    ap.add_argument("--runs-dir", default=None, help="demo run folders (default: a new temp dir)")
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=300, help="planted fit: teacher rows")
    ap.add_argument("--steps", type=int, default=40, help="planted fit: optimizer steps")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (0 = torch default; 1: steadier)"
    )
    args = ap.parse_args()
    if args.quick:
        args.texts, args.rounds, args.rows, args.steps = 40, 1, 48, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    picked, why = pick_dtype("cpu", cpu_flags())
    print(
        f"bench_dtype: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}; auto = {dtype_name(picked)} ({why})"
    )
    matmul_peak(1 if args.quick else 3)
    t0 = time.perf_counter()
    models = {}
    if not (args.skip_kl and args.skip_planted):
        models = {d: load_model(dtype=d) for d in DTYPES}
    if not args.skip_kl:
        kl_and_speed(models, args)
    if not args.skip_demo:
        demo_side_by_side(args)
    if not args.skip_planted:
        planted_fits(models, args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s, load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
