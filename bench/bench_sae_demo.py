"""The demo's fitted owl vector and its q/k/v fit, read in a trained SAE's latents (issue 15).

Runs the built-in demo experiment (src/steerdiff/data/demo.toml: an owl-steered teacher's
constrained numbers, a vector fitted at blocks.24.hook_resid_post, and q/k/v biases fitted
to a system-prompted teacher's data) with an `[sae]` section added: the SAE trained by
bench/bench_sae_train.py at blocks.24.hook_resid_post (8x, TopK k 32). For each fit the
pipeline's `sae` stage (interpret.sae_read) gives: the decomposition of the owl vector (the
q/k/v set has no vector at that hook: the decomposition of its mean activation difference
there), the mean change of every latent's activation on corpus text (first 5 and all
positions), and dashboards of the top latents (top-activating snippets, centred DLA tokens).

Prints and writes bench/results/sae_demo.json (top latents, their cosines / changes, the top
DLA tokens and best snippet of each dashboard), and copies the run's report.html to
bench/results/sae_demo_report.html (the dashboards, to look at).

Usage: python bench/bench_sae_demo.py [--sae runs/sae-bench/blocks.24.hook_resid_post]
       [--texts 200] [--runs-dir runs]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def summarise(res: dict, k: int = 10) -> dict:
    """The figures of one subject's reading that the README quotes."""
    if "skipped" in res:
        return {"skipped": res["skipped"]}
    dec = res.get("decomposition") or {}
    dash = {int(d["latent"]): d for d in res.get("dashboards", [])}

    def card(latent: int) -> dict:
        d = dash.get(latent)
        if d is None:
            return {}
        best = d["snippets"][0] if d.get("snippets") else None
        return {
            "dla_top": [t["token"] for t in d.get("dla_top", [])[:8]],
            "frac_active": d.get("frac_active"),
            "best_snippet": "".join(best["tokens"]) if best else None,
            "best_token": best["tokens"][best["pos"]] if best else None,
        }

    top_cos = [
        {**{x: r[x] for x in ("latent", "cosine", "pullback_dec")}, **card(int(r["latent"]))}
        for r in dec.get("top", [])[:k]
    ]
    up = res["effects_top"]["all"]["up"][:k]
    return {
        "decomposition_of": dec.get("of"),
        "norm": dec.get("norm"),
        "top_by_cosine": top_cos,
        "top_up_all": [{**r, **card(int(r["latent"]))} for r in up],
        "top_down_all": res["effects_top"]["all"]["down"][:k],
        "top_up_first_k": res["effects_top"]["first_k"]["up"][:k],
        "n_tokens": res["effects"]["n_tokens"],
        "n_texts": res["effects"]["n_texts"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sae", default="runs/sae-bench/blocks.24.hook_resid_post")
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--dashboards", type=int, default=5)
    ap.add_argument("--runs-dir", default="runs")
    args = ap.parse_args()

    from steerdiff.cli.run import demo_config_path
    from steerdiff.io import atomic_write_json, read_json
    from steerdiff.pipeline import load_config, parse_config, run_experiment

    base = load_config(demo_config_path())
    raw = base.model_dump(exclude_unset=True)
    raw["name"] = "demo-sae"
    raw["sae"] = {"path": args.sae, "texts": args.texts, "dashboards": args.dashboards}
    cfg = parse_config(raw, source="demo + [sae]")
    t0 = time.perf_counter()
    summary = run_experiment(cfg, args.runs_dir)
    seconds = time.perf_counter() - t0
    (sae_stage,) = [s for s in summary.stages.values() if s.kind == "sae"]
    data = read_json(sae_stage.path / "sae.json")
    out = {
        "bench": "bench_sae_demo",
        "sae": data["sae"],
        "texts": args.texts,
        "subjects": {r["name"]: summarise(r) for r in data["results"]},
        "fits": {
            s.name: s.info.get("gap_closed") for s in summary.stages.values() if s.kind == "fit"
        },
        "seconds": round(seconds, 1),
        "dtype": str(
            summary.stages[next(iter(summary.stages))].meta.get("provenance", {}).get("dtype")
        ),
    }
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "sae_demo.json", out)
    shutil.copyfile(summary.report, RESULTS / "sae_demo_report.html")
    print(json.dumps(out["subjects"], indent=1)[:6000])
    print(f"wrote {RESULTS / 'sae_demo.json'} and sae_demo_report.html", file=sys.stderr)


if __name__ == "__main__":
    main()
