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

import torch

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


def trait_latents(lm, sae, words: tuple[str, ...] = ("owl", "owls")) -> list[dict]:
    """Latents whose decoder direction promotes the trait word: one of its spellings (with and
    without a leading space or capital) is among the direction's 10 top centred DLA tokens."""
    import torch

    from steerdiff.interpret.dla import logit_basis

    tok = lm.tokenizer
    ids = set()
    for w in words:
        for form in (w, " " + w, w.capitalize(), " " + w.capitalize()):
            piece = tok.encode(form, add_special_tokens=False)
            if len(piece) == 1:
                ids.add(piece[0])
    basis = logit_basis(lm)  # [vocab, d_in]
    found = []
    with torch.no_grad():
        for start in range(0, sae.d_sae, 512):
            rows = sae.W_dec[start : start + 512]  # [n, d_in]
            top = (rows @ basis.T).topk(10, dim=-1).indices  # [n, 10]
            for j, t in enumerate(top.tolist()):
                hit = [i for i in t if i in ids]
                if hit:
                    found.append({"latent": start + j, "dla_rank": t.index(hit[0]) + 1})
    return found


def trait_ranks(sae, vectors: dict, latents: list[dict]) -> dict:
    """Rank (by cosine, 1 = best of d_sae) of each trait latent in each vector's decomposition."""
    from steerdiff.interpret.sae_decompose import decompose_vector

    out = {}
    for name, v in vectors.items():
        d = decompose_vector(sae, v)
        out[name] = [
            {**x, "rank": d.rank(x["latent"]), "cosine": float(d.cosine[x["latent"]])}
            for x in latents
        ]
    return out


def top_overlaps(sae, vectors: dict, k: int = 10) -> dict:
    """Each vector's k best latents by cosine, and how many each pair shares (chance:
    k * k / d_sae)."""
    from steerdiff.interpret.sae_decompose import decompose_vector

    tops = {n: [r["latent"] for r in decompose_vector(sae, v).top(k)] for n, v in vectors.items()}
    names = list(tops)
    shared = {
        f"{a} | {b}": len(set(tops[a]) & set(tops[b]))
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    cos = {
        f"{a} | {b}": float(
            torch.nn.functional.cosine_similarity(vectors[a].float(), vectors[b].float(), dim=0)
        )
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    return {"k": k, "top": tops, "shared": shared, "chance": k * k / sae.d_sae, "cosine": cos}


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
        "seconds_this_call": round(seconds, 1),  # 0-ish when every stage was cached
        "sae_stage_seconds": read_json(sae_stage.path / "stage.json").get("seconds"),
        "dtype": read_json(sae_stage.path / "stage.json")["provenance"].get("dtype"),
    }
    # Does the SAE have owl latents at all, and where do they rank for the owl vectors?
    from steerdiff.models import load_model
    from steerdiff.sae import load_sae
    from steerdiff.vectors import VectorSet

    lm = load_model(cfg.model, dtype=cfg.dtype)
    sae = load_sae(args.sae, lm)
    owl = trait_latents(lm, sae)
    hook = str(sae.hook)
    vectors = {}
    tv = [s for s in summary.stages.values() if s.name.startswith("teacher-vector-main")]
    if tv:
        teacher = VectorSet.load(tv[0].path / "teacher_vector.safetensors", lm)
        vectors["teacher contrast vector (owl system prompt)"] = teacher[hook]
    fit_stage = [s for s in summary.stages.values() if s.name.startswith("fit-vector-at")]
    if fit_stage:
        vectors["fitted owl vector"] = VectorSet.load(
            fit_stage[0].path / "vectors.safetensors", lm
        )[hook]
    qkv = data["results"]
    for r in qkv:
        if r["name"].startswith("fit-qkv") or r["name"].startswith("qkv"):
            vectors["q/k/v fit: mean activation difference"] = torch.tensor(
                r["effects"]["meta"]["act_diff_all_mean"]
            )
    out["owl_latents"] = {"found": owl, "ranks": trait_ranks(sae, vectors, owl)}
    out["top_latents_by_cosine"] = top_overlaps(sae, vectors)
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "sae_demo.json", out)
    shutil.copyfile(summary.report, RESULTS / "sae_demo_report.html")
    print(json.dumps(out["subjects"], indent=1)[:4000])
    print(json.dumps(out["owl_latents"], indent=1)[:3000])
    print(f"wrote {RESULTS / 'sae_demo.json'} and sae_demo_report.html", file=sys.stderr)


if __name__ == "__main__":
    main()
