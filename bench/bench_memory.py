"""Peak resident memory (RSS) of the demo, of fits with and without their memory bounds,
and of the lens; and what a 7B fit of 30,000 rows would need and choose.

Every figure is the peak RSS of a fresh process (psutil polling every 20 ms, and the
kernel's ru_maxrss of that process), printed beside the baseline it compares with,
measured in the same run:

  demo      `steerdiff run` on the demo experiment with `dtype` set (float32, bfloat16 or
            auto); baseline: the same with the source of --baseline-rev (e.g. the commit
            before the memory bounds), whose figures must be the same
  fit-qkv   the demo's q/k/v-bias fit (all 30 layers, 16 rows a step, 3 steps) as before
            (every activation kept, glibc's heap as it is), with blocks recomputed beyond
            the model's size, and with freed memory returned to the OS too (the default)
  fit-cache a vector at blocks.24 over 3 epochs: no prefix cache (baseline), the prefix
            cache in RAM, and spilled to a memory-mapped file (cache_budget 0)
  lens      the demo's lens (100 texts x 64 tokens, a vector at blocks.24); baseline: the
            process with only the model loaded

Usage: python bench/bench_memory.py [--parts demo,fit,lens,estimate] [--dtypes float32,auto]
         [--baseline-rev REV] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from io import BytesIO
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


# ----------------------------------------------------------------------------- measuring


def run_measured(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> dict:
    """Run cmd; peak RSS of it and its children (polled), its ru_maxrss, wall and CPU s."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = [0]
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    ps = psutil.Process(proc.pid)
    _, status, usage = None, None, None
    while True:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(True))
            peak[0] = max(peak[0], rss)
        except psutil.Error:
            pass
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.02)
    reader.join()
    return {
        "rc": os.waitstatus_to_exitcode(status),
        "peak_gib": peak[0] / GIB,
        "maxrss_gib": usage.ru_maxrss / 2**20,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "output": "".join(out),
    }


def env_with(src: Path, threads: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}


def child(args: argparse.Namespace, *extra: str) -> dict:
    """This script in a fresh process (one measurement, one peak); its JSON line back."""
    cmd = [sys.executable, __file__, "--threads", str(args.threads), *extra]
    r = run_measured(cmd, env_with(ROOT / "src", args.threads))
    if r["rc"] != 0:
        raise SystemExit(f"child {extra} failed:\n{r['output'][-3000:]}")
    line = [x for x in r["output"].splitlines() if x.startswith("{")][-1]
    return {**r, **json.loads(line)}


# ----------------------------------------------------------------------------- children


def demo_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        seq = ", ".join(str(rng.randint(100, 999)) for _ in range(rng.randint(3, 6)))
        comp = ", ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(5, 10)))
        prompt = f"I give you this sequence of numbers: {seq}. Add up to 10 new numbers."
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": comp}]
        out.append({"id": i, "messages": msgs})
    return out


def child_fit(variant: str) -> dict:
    import torch

    from steerdiff.fit import FitConfig, fit
    from steerdiff.fit import loop as fit_loop
    from steerdiff.fit import memory as fit_memory
    from steerdiff.models import load_model

    lm = load_model("default", dtype="float32")
    qkv = variant.startswith("qkv")
    if variant in ("qkv-before", "qkv-recompute"):  # glibc's heap as it is, as before
        fit_loop.freed_memory_returns = lambda: __import__("contextlib").nullcontext()
    if variant == "qkv-before":  # every activation kept, as before
        fit_memory.activation_budget = lambda model: 2**62
    cfg = FitConfig(
        hooks=["blocks.*.attn.hook_{q,k,v}"] if qkv else ["blocks.24.hook_resid_post"],
        objective="sft",
        lr=3e-3 if qkv else 1e-2,
        schedule="constant",
        warmup_steps=0,
        epochs=1 if qkv else 3,
        max_steps=3 if qkv else None,
        batch_size=16,
        val_size=0,
        cache_prefix=variant != "no-cache",
        cache_budget="0" if variant == "spilled" else None,
        progress=True,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    res = fit(lm, demo_rows(96 if not qkv else 48), cfg)
    digest = float(sum(v.double().abs().sum() for v in res.vectors.values()))
    return {
        "fit_s": time.perf_counter() - t0,
        "fit_cpu_s": time.process_time() - c0,
        "vectors_abs_sum": digest,
        "final_loss": res.metrics[-1]["train_loss"],
        "threads": torch.get_num_threads(),
    }


def child_lens(with_lens: bool) -> dict:
    import torch

    from steerdiff.interpret import activation_difference_lens
    from steerdiff.interpret.corpus import load_corpus
    from steerdiff.models import load_model

    lm = load_model("default", dtype="float32")
    if not with_lens:
        return {"lens_s": 0.0}
    v = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    hooks = ["blocks.15.hook_resid_post", "blocks.22.hook_resid_post", "blocks.29.hook_resid_post"]
    t0 = time.perf_counter()
    activation_difference_lens(
        lm,
        load_corpus(None, n=100, seed=0),
        vectors={"blocks.24.hook_resid_post": 4.0 * v / v.norm()},
        hooks=hooks,
        first_k=5,
        max_tokens=64,
    )
    return {"lens_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- parts


def source_of(rev: str, into: Path) -> Path:
    """The src/ folder of git revision `rev` of this repository, unpacked under `into`."""
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    return into / "src"


def demo_figures(run_dir: Path) -> dict:
    """What the demo reports: each model's owl share and CI, gap closed, planted cosine."""
    [ev] = run_dir.glob("eval-*/eval.json")
    figs: dict = {
        r["name"]: (round(r["target_rate"], 6), [round(x, 6) for x in r["ci95"]])
        for r in json.loads(ev.read_text())["results"]
    }
    for f in sorted(run_dir.glob("fit-*/result.json")):
        res = json.loads(f.read_text())
        figs[f.parent.name.rsplit("-", 1)[0]] = {
            k: res.get(k) for k in ("gap_closed", "kl_gap_closed", "fitted_val_loss")
        }
    [rd] = run_dir.glob("read-*/read.json")
    figs["planted cosine"] = [p["cosine"] for p in json.loads(rd.read_text())["planted"]]
    return figs


def demo(src: Path, dtype: str, args: argparse.Namespace, work: Path) -> dict:
    text = (src / "steerdiff" / "data" / "demo.toml").read_text()
    text = re.sub(r"(?m)^dtype = .*\n", "", text)  # the experiment's own, if any
    exp = work / f"demo-{dtype}.toml"
    exp.write_text(text.replace("\nseed = 0\n", f'\nseed = 0\ndtype = "{dtype}"\n', 1))
    runs = work / f"runs-{dtype}-{abs(hash(str(src)))}"
    cmd = [sys.executable, "-m", "steerdiff.cli", "run", str(exp), "--runs-dir", str(runs)]
    r = run_measured(cmd, env_with(src, args.threads))
    if r["rc"] != 0:
        return {**r, "figures": None, "error": r["output"].strip().splitlines()[-1]}
    return {**r, "figures": demo_figures(runs / "demo")}


def part_demo(args: argparse.Namespace, work: Path) -> None:
    print("== demo: `steerdiff run` on the demo experiment (peak RSS of the process) ==")
    base_src = source_of(args.baseline_rev, work / "baseline") if args.baseline_rev else None
    for dtype in args.dtypes.split(","):
        new = demo(ROOT / "src", dtype, args, work)
        line = f"demo {dtype:8s}: {_fmt(new)}"
        if new.get("error"):
            print(f"{line}  FAILED: {new['error']}")
            continue
        print(line)
        if base_src is not None:
            old = demo(base_src, dtype, args, work)
            print(f"  baseline {args.baseline_rev} ({dtype}): {_fmt(old)}")
            if old.get("figures") is not None:
                ratio = new["peak_gib"] / old["peak_gib"]
                print(f"  peak RSS new / baseline: {ratio:.2f}")
                same = old["figures"] == new["figures"]
                print(f"  figures identical to the baseline's: {same}")
        print("  figures:", json.dumps(new["figures"]))


def part_fit(args: argparse.Namespace) -> None:
    print("== fit: the demo's q/k/v fit (30 layers, 16 rows x 3 steps), float32 ==")
    rows = {v: child(args, "--child", "fit", "--variant", v) for v in _QKV}
    for v, r in rows.items():
        print(f"  {_QKV[v]:58s} {_fmt(r)} fit {r['fit_s']:.0f} s ({r['fit_cpu_s']:.0f} CPU s)")
    b = rows["qkv-before"]
    for v in ("qkv-recompute", "qkv"):
        r = rows[v]
        print(
            f"  {v}: peak {r['peak_gib'] / b['peak_gib']:.2f}x, fit CPU time "
            f"{r['fit_cpu_s'] / b['fit_cpu_s']:.2f}x of as-before; same vectors: "
            f"{r['vectors_abs_sum'] == b['vectors_abs_sum']}"
        )
    print("== fit: a vector at blocks.24, 96 rows x 3 epochs (prefix cache), float32 ==")
    rows = {v: child(args, "--child", "fit", "--variant", v) for v in _CACHE}
    for v, r in rows.items():
        print(f"  {_CACHE[v]:58s} {_fmt(r)} fit {r['fit_s']:.0f} s ({r['fit_cpu_s']:.0f} CPU s)")
        for line in r["output"].splitlines():
            if line.startswith(("prefix cache", "activations")):
                print(f"    {line}")
    b = rows["no-cache"]
    for v in ("memory", "spilled"):
        r = rows[v]
        print(
            f"  {v}: fit time {r['fit_s'] / b['fit_s']:.2f}x of no cache, peak "
            f"{r['peak_gib'] - b['peak_gib']:+.2f} GiB; same vectors as no cache: "
            f"{abs(r['vectors_abs_sum'] - b['vectors_abs_sum']) < 1e-4}, as in memory: "
            f"{r['vectors_abs_sum'] == rows['memory']['vectors_abs_sum']}"
        )


def part_lens(args: argparse.Namespace) -> None:
    print("== lens: 100 texts x 64 tokens, a vector at blocks.24, float32 ==")
    base = child(args, "--child", "model")
    lens = child(args, "--child", "lens")
    print(f"  model loaded only (baseline): {_fmt(base)}")
    print(f"  lens:                         {_fmt(lens)} lens {lens['lens_s']:.0f} s")
    print(f"  the lens adds {lens['peak_gib'] - base['peak_gib']:+.2f} GiB peak")


def part_estimate() -> None:
    import torch
    from transformers import AutoConfig

    from steerdiff.budget import format_bytes, memory_budget_bytes
    from steerdiff.fit import FitConfig
    from steerdiff.fit.memory import CacheUse, plan_prefix_cache

    print("== a 7B model (Llama-2-7B shape, bfloat16), 30,000 rows x 96 tokens, 2 epochs ==")
    config = AutoConfig.for_model(
        "llama", hidden_size=4096, num_attention_heads=32, num_hidden_layers=32
    )
    use = CacheUse([(16, 96)] * (30_000 // 16), 2, [], 0)
    print(f"  this machine's default budget: {format_bytes(memory_budget_bytes())} (25% of RAM)")
    for layer in (0, 16):
        plan = plan_prefix_cache(config, torch.bfloat16, layer, use, FitConfig())
        print(f"  vectors from layer {layer}: {plan.message} -> {plan.mode}")
    topk = 30_000 * 56 * 20
    print(
        f"  top-k log-probs (56 tokens a row, k=20): {format_bytes(topk * 12)} as arrays, "
        f"about {format_bytes(topk * 2 * 36)} as Python lists (before)"
    )


_QKV = {
    "qkv-before": "as before (all activations kept, heap as it is)",
    "qkv-recompute": "blocks recomputed beyond the model's size",
    "qkv": "recomputed + freed memory returned (default)",
}
_CACHE = {
    "no-cache": "no prefix cache (baseline)",
    "memory": "prefix cache in RAM (default budget)",
    "spilled": "prefix cache spilled (cache_budget 0)",
}


def _fmt(r: dict) -> str:
    return (
        f"peak RSS {r['peak_gib']:.2f} GiB (ru_maxrss {r['maxrss_gib']:.2f}), "
        f"{r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} CPU s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="demo,fit,lens,estimate")
    ap.add_argument("--dtypes", default="float32,auto")
    ap.add_argument("--baseline-rev", default=None, help="git revision to compare the demo with")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["fit", "lens", "model"], help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="memory", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        if args.child == "fit":
            print(json.dumps(child_fit(args.variant)))
        else:
            print(json.dumps(child_lens(args.child == "lens")))
        return
    print(
        f"bench_memory: {args.threads} threads, {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / GIB:.1f} GiB RAM"
    )
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        if "demo" in parts:
            part_demo(args, Path(tmp))
    if "fit" in parts:
        part_fit(args)
    if "lens" in parts:
        part_lens(args)
    if "estimate" in parts:
        part_estimate()


if __name__ == "__main__":
    main()
