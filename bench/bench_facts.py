"""The false-fact organism on the embedded SmolLM2-135M (issue 13's acceptance bench).

Runs examples/false_facts.toml through the pipeline (`steerdiff run`'s stages): documents
asserting the built-in false facts (tasks.facts, from templates), a LoRA r=8 finetune and
q/k/v biases at every layer fitted to them (loss on every token); then, measured in the
same run, belief in the false facts (P(false) / (P(false) + P(true)) per held-out
question, direct and generalisation, mean and 95% CI across questions) for the base model,
the LoRA and the vectors, paired per question; the faithfulness of the vectors to the LoRA
on the offline corpus (KLs with CIs, fraction explained, per-layer cosines); and the
held-out document loss of each (the fits' validation split).

    python bench/bench_facts.py [--quick] [--per-fact 6] [--epochs 2] [--threads 1]
        [--runs-dir runs/bench] [--out bench/results/bench_facts.json]

The default sizes (15 facts x 6 documents, 2 epochs) finish in ~40 min on 2 CPU cores
shared with other jobs (a forward+backward of the 135M model ran at ~12 tokens/s under that
load; ~350 on an idle pair, where --per-fact 24 --epochs 3, the example's, fit the same
time). Stages are cached in --runs-dir: a second run with the same settings re-reads them (the
stage times in the JSON are those of the run that computed them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch

from steerdiff.evals.beliefs import BeliefResult
from steerdiff.io import atomic_write_json, provenance, read_json
from steerdiff.pipeline import parse_config, run_experiment
from steerdiff.report.figures import beliefs_png
from steerdiff.report.run_folder import read_run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "false_facts.toml"


def experiment(args: argparse.Namespace) -> dict:
    """examples/false_facts.toml with this run's sizes (float32 on this CPU)."""
    import tomllib

    raw = tomllib.loads(EXAMPLE.read_text())
    raw["name"] = "bench-facts-quick" if args.quick else "bench-facts"
    raw["dtype"] = args.dtype
    raw["device"] = args.device
    raw["task"] = {**raw["task"], "per_fact": args.per_fact}
    for section in (*raw["fits"], *raw["baselines"]):
        section["epochs"] = args.epochs
        if args.quick:
            section["max_steps"] = 4
    raw["faithfulness"] = {**raw["faithfulness"], "texts": args.texts}
    raw["beliefs"] = {**raw.get("beliefs", {}), "n_samples": args.samples}
    raw["read"] = {"lens_texts": 0}  # the lens is not part of this bench
    return raw


def ci(s: dict, scale: float = 1.0) -> str:
    lo, hi = s["ci95"]
    return f"{scale * s['mean']:.3f} [{scale * lo:.3f}, {scale * hi:.3f}]"


def belief_table(beliefs: dict) -> dict:
    """{model: {kind: summary}} and the paired differences, from the beliefs stage."""
    table = {
        r["name"]: {k: v["p_false"] for k, v in r["by_kind"].items()} for r in beliefs["results"]
    }
    paired = [
        {"a": p["a"], "b": p["b"], **{k: v["p_false"] for k, v in p.items() if k not in ("a", "b")}}
        for p in beliefs["paired"]
    ]
    return {"p_false": table, "paired": paired}


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def faith_summary(f: dict) -> dict:
    """The faithfulness figures: KLs with CIs, fraction explained, the per-layer cosines and
    their summary (mean over layers, min, max), the held-out loss, the vector-set pairs."""
    cos = {}
    for key in ("cos_first_k", "cos_all"):
        xs = [x for x in f[key] if x is not None]
        cos[key] = {
            "per_layer": dict(zip(map(str, f["layers"]), f[key], strict=True)),
            "mean": _mean(xs),
            "min": min(xs, default=None),
            "max": max(xs, default=None),
        }
    pairs = [
        {k: p[k] for k in ("vectors", "reference", "kl_finetune_vectors", "fraction_explained")}
        for p in f.get("vector_pairs", [])
    ]
    keep = ("vectors", "finetune", "kl_finetune_base", "kl_vectors_base", "kl_finetune_vectors")
    keep += ("fraction_explained", "fraction_explained_ci", "first_k", "n_texts", "n_tokens")
    return {
        **{k: f[k] for k in keep},
        "corpus": f["corpus"],
        "cosines": cos,
        "heldout": f["heldout"],
        "vector_pairs": pairs,
    }


def held_out(run_dir: Path) -> dict:
    """Held-out document loss (the validation split of each fit) and the gap closed."""
    out = {}
    for s in read_run(run_dir).of_kind("fit", "baseline"):
        i = s.info
        out[s.name] = {
            k: i.get(k) for k in ("base_val_loss", "fitted_val_loss", "steps", "stopped")
        }
        out[s.name]["examples"] = (i.get("data") or {}).get("examples")  # chunks trained on
        out[s.name]["seconds"] = s.meta.get("seconds")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 3 documents per fact, 4 steps")
    p.add_argument("--per-fact", type=int, default=None, help="documents per fact (default 6)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--texts", type=int, default=None, help="corpus texts for faithfulness")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: fastest on a shared CPU)"
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    p.add_argument("--samples", type=int, default=0, help="sampled answers per belief question")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench"))
    p.add_argument("--fresh", action="store_true", help="delete the run folder first")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.per_fact = args.per_fact or (3 if args.quick else 6)
    args.texts = args.texts or (8 if args.quick else 32)
    args.epochs = 1 if args.quick else args.epochs
    suffix = "_quick" if args.quick else ""
    out = Path(args.out or ROOT / "bench" / "results" / f"bench_facts{suffix}.json")
    torch.set_num_threads(args.threads)

    raw = experiment(args)
    cfg = parse_config(raw, source=f"{EXAMPLE} (bench sizes)")
    run_dir = Path(args.runs_dir) / cfg.name
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = run_experiment(cfg, args.runs_dir)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0

    run = read_run(summary.run_dir)
    data = run.first("data")
    beliefs = read_json(run.first("beliefs").path / "beliefs.json")  # type: ignore[union-attr]
    faith = read_json(run.first("faithfulness").path / "faithfulness.json")  # type: ignore[union-attr]
    result = {
        "quick": args.quick,
        "dtype": args.dtype,
        "device": args.device,
        "threads": args.threads,
        "data": data.info if data else None,
        "per_fact": args.per_fact,
        "epochs": args.epochs,
        "samples": args.samples,
        "beliefs": belief_table(beliefs),
        "faithfulness": faith_summary(faith),
        "held_out": held_out(summary.run_dir),
        "stage_seconds": {s.name: s.meta.get("seconds") for s in run.stages},
        # the stages' own times (from their stage.json: those of the run that computed them)
        "stage_seconds_total": round(sum(s.meta.get("seconds") or 0 for s in run.stages), 1),
        "wall_seconds": round(wall, 1),  # of this invocation (small when every stage is cached)
        "cpu_seconds": round(cpu, 1),
        "all_cached": all(s.cached for s in summary.stages.values()),
        "report": str(summary.report),
        "config": raw,
        "provenance": provenance(None, None, cfg.seed),
    }
    atomic_write_json(out, result)
    png = beliefs_png(
        {r["name"]: BeliefResult.from_dict(r) for r in beliefs["results"]}, out.with_suffix(".png")
    )
    report(result, out, png)


def report(r: dict, out: Path, png: Path) -> None:
    label = "QUICK (smoke sizes; not the figures)" if r["quick"] else "full"
    d = r["data"]["data"] if r["data"] else {}
    examples = {h["examples"] for h in r["held_out"].values()}
    print(
        f"\nbench_facts ({label}), {r['dtype']} on {r.get('device', 'cpu')}, {r['threads']} threads"
    )
    print(
        f"data: {d.get('rows')} documents ({r['per_fact']} per fact), {examples} chunks "
        f"(90% trained, 10% held out); {r['epochs']} epochs"
    )
    print("\nbelief in the false facts, P(false) mean [95% CI] across questions:")
    for name, kinds in r["beliefs"]["p_false"].items():
        print(f"  {name:24s} " + "  ".join(f"{k}: {ci(s)}" for k, s in kinds.items()))
    print("paired per question (a - b):")
    for p in r["beliefs"]["paired"]:
        kinds = {k: v for k, v in p.items() if k not in ("a", "b")}
        print(f"  {p['a']} - {p['b']}: " + "  ".join(f"{k}: {ci(s)}" for k, s in kinds.items()))
    f = r["faithfulness"]
    print(
        f"\nfaithfulness of {f['vectors']} to {f['finetune']} "
        f"({f['n_texts']} corpus texts, {f['n_tokens']} tokens), KL in nats/token:"
    )
    for k in ("kl_finetune_base", "kl_vectors_base", "kl_finetune_vectors"):
        print(f"  {k}: {ci(f[k])}")
    fe, fci = f["fraction_explained"], f["fraction_explained_ci"]
    fe_ci = f" [{fci[0]:.3f}, {fci[1]:.3f}]" if fci else ""
    print(f"  fraction explained: {'undefined' if fe is None else f'{fe:.3f}'}{fe_ci}")
    for key, c in f["cosines"].items():
        if c["mean"] is not None:
            print(
                f"  {key} over layers: mean {c['mean']:.3f}, min {c['min']:.3f}, max {c['max']:.3f}"
            )
    for p in f["vector_pairs"]:
        print(f"  {p['vectors']} vs {p['reference']}: KL {ci(p['kl_finetune_vectors'])}")
    h = f["heldout"]
    gci = h.get("gap_closed_ci")
    print(
        f"\nheld-out documents ({h['n_rows']} rows, {h['n_tokens']} tokens), CE per token: "
        f"base {h['ce_base']:.4f}, LoRA {h['ce_finetune']:.4f}, vectors {h['ce_vectors']:.4f}; "
        f"vectors close {h['gap_closed']:.3f}"
        + (f" [{gci[0]:.3f}, {gci[1]:.3f}]" if gci else "")
        + " of the LoRA's gap"
    )
    for name, x in r["held_out"].items():
        print(
            f"  {name}: val loss base {x['base_val_loss']}, fitted {x['fitted_val_loss']} "
            f"({x['steps']} steps, {x['seconds']} s)"
        )
    print(
        f"\nstages {r['stage_seconds_total']} s; this invocation: wall {r['wall_seconds']} s, "
        f"CPU {r['cpu_seconds']} s; every stage cached: {r['all_cached']}"
    )
    print(f"wrote {out} and {png}; report {r['report']}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
