"""Benchmark: the layer x strength x readout sweep on the embedded SmolLM2-135M-Instruct.

Target (ISSUE 3): the full sweep (30 layers x 4 strengths x 3 readouts = 360 cells)
in at most 600 s on 2 CPU cores. Also times one exact-scorer evaluation (cached,
batched) against the naive way (one full teacher-forced row per question x answer
form, batched, no KV cache) on the same questions.

    python bench/bench_sweep.py                      # the full sweep
    python bench/bench_sweep.py --layers 6,12,18,24  # a subset; extrapolates to 360 cells
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from steerdiff.evals import (
    answer_variants,
    exact_preference,
    load_category,
    question_prompts,
)
from steerdiff.models import load_model
from steerdiff.sweep import SweepConfig, run_sweep

TARGET_S = 600.0  # the full 360-cell sweep on 2 cores
# Before the partial-forward sweep (full steered passes, model.generate for response_mean):
# 3538 CPU-s extrapolated to 360 cells (2 torch threads, loaded machine; ~9.8 CPU-s per cell,
# inflated by OpenMP spin-waiting); the same cells at 1 thread: ~1.85 CPU-s per cell.
BASELINE_CPU_S = 3538.0
BASELINE_CELL_CPU_S_1T = 1.85


def naive_exact_seconds(lm, questions, candidates) -> float:
    """One forward over every full (question + answer form) row, batched, no cache."""
    tok = lm.tokenizer
    rows = []
    for p in question_prompts(lm, questions, None):
        for c in candidates:
            for v in answer_variants(c):
                rows.append(p + tok(v, add_special_tokens=False)["input_ids"])
    t0 = time.perf_counter()
    for i in range(0, len(rows), 32):
        chunk = rows[i : i + 32]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(chunk):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        with torch.no_grad():
            lm.model(input_ids=ids, attention_mask=mask)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="", help="comma list; default: all 30")
    ap.add_argument("--out", default="runs/bench_sweep")
    ap.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads; on a loaded machine use 1: CPU-s at 2 threads include spin-waits",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}, "
        f"load average at start: {os.getloadavg()}"
    )
    lm = load_model()
    cat = load_category("animals")

    t0, c0 = time.perf_counter(), time.process_time()
    full = exact_preference(lm, "owl", cat)
    t_full, c_full = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    sub = exact_preference(lm, "owl", cat, n_questions=5)
    t_sub = time.perf_counter() - t0
    t_naive2 = naive_exact_seconds(lm, cat.questions[:2], cat.candidates)
    print(
        f"exact scorer, 50 questions x {len(cat.candidates)} candidates: {t_full:.1f} s wall, {c_full:.1f} CPU-s "
        f"(owl share {full.target_rate:.4f})"
    )
    print(
        f"exact scorer, 5 questions (sweep default): {t_sub:.1f} s (owl share {sub.target_rate:.4f})"
    )
    print(
        f"naive baseline (full row per question x answer form, no cache): {t_naive2 / 2:.2f} s per "
        f"question vs cached {t_full / 50:.2f} s per question"
    )

    layers = [int(x) for x in args.layers.split(",") if x] or None
    cfg = SweepConfig(layers=layers)
    t0, c0 = time.perf_counter(), time.process_time()
    res = run_sweep(lm, cfg, progress=True)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    paths = res.write(args.out)
    n_cells = len(res.cells)
    t = res.timings
    scale = 360 / n_cells
    print(
        f"sweep: {n_cells} cells in {total:.1f} s wall (baseline {t['baseline_s']:.1f} s, "
        f"extract {t['extract_s']:.1f} s, cells {t['cells_s']:.1f} s = {t['per_cell_s']:.2f} s "
        f"per cell, confirm {t['confirm_s']:.1f} s); {cpu:.0f} CPU-s"
    )
    wall_full = t["baseline_s"] + t["extract_s"] + t["cells_s"] * scale + t["confirm_s"]
    # On a shared machine wall time reflects the other tenants; CPU-seconds / threads is
    # what the same work takes on idle cores (both threads busy all the time).
    cpu_full = (
        t["baseline_cpu_s"] + t["extract_cpu_s"] + t["cells_cpu_s"] * scale + t["confirm_cpu_s"]
    )
    what = "full sweep" if n_cells == 360 else "extrapolated full sweep (360 cells)"
    print(
        f"per cell: {t['cells_cpu_s'] / n_cells:.2f} CPU-s (before: ~{BASELINE_CELL_CPU_S_1T} "
        f"CPU-s at 1 thread); setup outside cells: baseline {t['baseline_cpu_s']:.0f}, extract "
        f"{t['extract_cpu_s']:.0f}, confirm {t['confirm_cpu_s']:.0f} CPU-s"
    )
    if n_cells != 360:
        print(
            f"(extrapolated from {n_cells} cells: a cell's cost falls with its layer, so pick "
            "layers spread evenly over 0-29, e.g. 1,4,...,28)"
        )
    print(
        f"{what}: {wall_full:.0f} s wall here; {cpu_full:.0f} CPU-s = about "
        f"{cpu_full / args.threads:.0f} s on {args.threads} idle cores; target {TARGET_S:.0f} s "
        f"(before: {BASELINE_CPU_S:.0f} CPU-s)"
    )
    print(f"unsteered owl share: {res.baseline['target_rate']:.4f}")
    for name, c in (("best within bounds", res.best), ("best unbounded", res.best_unbounded)):
        if c:
            print(
                f"{name}: {c.readout} layer {c.layer} x{c.strength:g}: owl {c.target_rate:.4f} "
                f"({c.target_rate / max(res.baseline['target_rate'], 1e-9):.1f}x), "
                f"off-target {c.off_target} {c.off_target_rate:.3f} (gain {c.off_target_gain:+.3f}), "
                f"KL {c.kl:.3f}"
            )
    if res.confirm:
        c = res.confirm
        print(
            f"confirmed on {c['n_questions']} questions: owl {c['unsteered']['target_rate']:.4f} "
            f"-> {c['steered']['target_rate']:.4f} (95% CI {c['steered']['ci95'][0]:.4f}-"
            f"{c['steered']['ci95'][1]:.4f}) at {c['cell']['readout']} layer {c['cell']['layer']} "
            f"x{c['cell']['strength']:g}"
        )
    print(f"load average at end: {os.getloadavg()}")
    print("wrote", ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
