"""Where a stage's time goes: torch.profiler self CPU time per op, grouped, in one line;
and the memory-bound ceiling of a decode step (copy bandwidth, bytes read per step).

Used by bench/bench_throughput.py. A stage's run calls `mark()` where its timed (and
profiled) part starts; the part ends when the run returns.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

import torch
from _flops import ModelShape
from torch.profiler import ProfilerActivity, profile

Mark = Callable[[], None]
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}
COPIES = {"aten::cat", "aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"}
CATEGORIES = ("matmul", "attention", "copy/cat", "other ops", "outside ops")


def profile_run(run: Callable[[Mark], Any]) -> dict[str, float]:
    """Seconds of the timed part per category (matmul, attention, copy/cat, other ops,
    outside ops = wall minus time in ops: Python, HF glue, dispatch) and per op ("op:...")."""
    prof = profile(activities=[ProfilerActivity.CPU])
    t0: list[float] = []

    def mark() -> None:
        prof.start()
        t0.append(time.perf_counter())

    run(mark)
    wall = time.perf_counter() - t0[0]
    prof.stop()
    cats: dict[str, float] = collections.defaultdict(float)
    for ev in prof.key_averages():
        sec = ev.self_cpu_time_total / 1e6
        cats["op:" + ev.key] += sec
        if ev.key in MATMULS or "mkldnn" in ev.key or "gemm" in ev.key:
            cats["matmul"] += sec
        elif "scaled_dot_product" in ev.key or "flash_attention" in ev.key:
            cats["attention"] += sec
        elif ev.key in COPIES:
            cats["copy/cat"] += sec
        else:
            cats["other ops"] += sec
    in_ops = sum(cats[k] for k in CATEGORIES[:-1])
    cats["outside ops"] = max(wall - in_ops, 0.0)
    cats["wall"] = wall
    return cats


def diagnosis(what: str, prof: dict[str, float], matmul_flops: int, peak: float) -> str:
    """One line: where the time of `what` goes, and how fast its matmuls run."""
    wall = prof["wall"]
    parts = ", ".join(f"{k} {prof[k] / wall:.0%}" for k in CATEGORIES)
    mm_rate = matmul_flops / max(prof["matmul"], 1e-9) / 1e9
    ops = sorted(((v, k[3:]) for k, v in prof.items() if k.startswith("op:")), reverse=True)
    top = ", ".join(f"{k.removeprefix('aten::')} {v / wall:.0%}" for v, k in ops[:4])
    return (
        f"  {what:29s} {wall:6.1f}s: {parts}; matmul kernels at {mm_rate:.0f} GFLOP/s = "
        f"{mm_rate / peak:.0%} of peak; top ops: {top}"
    )


def bandwidth_gbs() -> float:
    """Copy bandwidth (GB/s, read + write) of a 256 MB buffer, best of 5."""
    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def decode_roofline(
    shape: ModelShape, dt: str, b: int, cache_len: int, step_flops: float, bw: float, peak: float
) -> str:
    """What one decode step of b rows must read from memory (every weight, the K/V of
    cache_len positions), and the ceiling that puts on its FLOP/s at bw GB/s."""
    elt = torch.finfo(getattr(torch, dt)).bits // 8
    weights = (shape.n_layers * shape.block_params + shape.head_params) * elt
    kv = shape.n_layers * b * cache_len * 2 * shape.d_kv * elt
    ceiling = step_flops / ((weights + kv) / (bw * 1e9)) / 1e9
    return (
        f"  decode {dt}: a step ({b} rows x 1 token) reads {weights / 1e6:.0f} MB of weights + "
        f"{kv / 1e6:.0f} MB of K/V for {step_flops / 1e9:.1f} GFLOP "
        f"({step_flops / (weights + kv):.0f} FLOP/byte); at {bw:.1f} GB/s that caps it at "
        f"{ceiling:.0f} GFLOP/s = {ceiling / peak:.0%} of the matmul peak (each byte read once)"
    )
