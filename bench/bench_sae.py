"""Ground truth for reading vectors through an SAE, on the embedded model.

Plant an SAE latent as the teacher's steering (teacher kind "sae": coeff x W_dec[latent]
added at the SAE's hook, all positions), have it write constrained number lists (the numbers
task, as the demo does), fit ONE vector at that hook with the demo's "vector-at-steered-hook"
fit (src/steerdiff/data/demo.toml), decompose it in the SAE's latent basis
(interpret.sae_decompose) and report the planted latent's rank among all latents by cosine,
the cosine itself, and its rank by the corpus latent-effect of the fitted vector
(interpret.sae_effects, when present). Controls: a random latent's rank and cosine.

The coefficient: unless --coeff is given, each of --coeffs is tried on a few prompts against
the plain model (same prompts, same sampling seed): flip_rate (per token, how often the
steered token differs given the same history) and changed_tokens (position by position,
inflated by divergence: after a first difference the histories differ). The smallest coeff
with flip_rate >= --min-flip (0.25) whose rows still pass the numbers filter (valid rate
>= 0.9 x the plain model's) is used; the sweep is in the JSON.

SAE: --sae PATH (an SAE for the embedded model, e.g. one `steerdiff sae train` wrote). Without
it, a random SAE is made (seeded; unit-norm decoder rows, encoder = decoder transposed, 8x,
at blocks.24.hook_resid_post), for development: the JSON says which SAE was used.

Usage: python bench/bench_sae.py [--sae PATH] [--latent N] [--coeff C] [--n-prompts 160]
       [--objective online --tag online] [--quick]
Writes bench/results/sae_ground_truth[_TAG].json (--quick: ..._quick.json). --objective
replaces the demo fit's objective (distill on the stored top-20) with, e.g., online
distillation (the fit default, which recovered planted vectors best: docs/fit.md).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from steerdiff.cli.run import demo_config_path
from steerdiff.dtypes import dtype_name
from steerdiff.fit import FitConfig, fit
from steerdiff.fit.planted import cosine
from steerdiff.generate import load_dataset
from steerdiff.interpret.sae_decompose import decompose_vector
from steerdiff.io import atomic_write_json
from steerdiff.models import LoadedModel, load_model
from steerdiff.pipeline.config import load_config
from steerdiff.sae import SAE, load_sae, save_sae
from steerdiff.tasks.numbers import make_dataset
from steerdiff.teachers import build_teacher
from steerdiff.vectors import VectorSet

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_HOOK = "blocks.24.hook_resid_post"  # the demo's steered hook


def random_sae(lm: LoadedModel, hook: str, expansion: int, seed: int, out: Path) -> Path:
    """A seeded random ReLU SAE for `lm` at `hook` (unit-norm decoder rows, W_enc = W_dec^T),
    saved as a SAELens folder."""
    d_in = lm.model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(expansion * d_in, d_in, generator=g)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    sae = SAE(w_dec.T.clone(), torch.zeros(len(w_dec)), w_dec, torch.zeros(d_in), hook=hook)
    return save_sae(sae, out, extra={"steerdiff": {"random_init_seed": seed}})


def generate(lm: LoadedModel, spec: dict, out: Path, n: int, task: Any, seed: int) -> tuple:
    """(rows, manifest) of the numbers dataset a teacher writes (constrained, the demo's
    task settings)."""
    teacher = build_teacher(spec, lm)
    make_dataset(
        teacher,
        str(out),
        n_prompts=n,
        constrained=task.constrained,
        topk=task.topk_logprobs,
        max_new_tokens=task.max_new_tokens,
        batch_size=task.batch_size,
        seed=seed,
        probe=0,
    )
    return load_dataset(out)


def changed_fraction(rows: list[dict], plain: list[dict]) -> float:
    """Fraction of completion tokens that differ from the plain model's at the same position
    (same prompt ids, same sampling seed); tokens past the shorter completion count as changed."""
    changed = total = 0
    by_id = {r["id"]: r for r in plain}
    for a in rows:
        if a["id"] not in by_id:
            continue
        x, y = a["completion_ids"], by_id[a["id"]]["completion_ids"]
        total += max(len(x), len(y))
        changed += sum(i != j for i, j in zip(x, y, strict=False)) + abs(len(x) - len(y))
    return changed / max(total, 1)


def flip_rate(rows: list[dict], plain: list[dict]) -> float:
    """Per-token probability that the teacher's token differs from the plain model's given
    the same history: rows that diverged / tokens compared up to each row's first difference
    (same prompts, same sampling seed). Unlike changed_fraction it does not count the tokens
    after a divergence, which differ because the histories do (an estimate of the
    distribution shift per token)."""
    flips = compared = 0
    by_id = {r["id"]: r for r in plain}
    for a in rows:
        if a["id"] not in by_id:
            continue
        x, y = a["completion_ids"], by_id[a["id"]]["completion_ids"]
        first = next((t for t, (i, j) in enumerate(zip(x, y, strict=False)) if i != j), None)
        if first is None and len(x) == len(y):
            compared += len(x)
        else:
            flips += 1
            compared += (first if first is not None else min(len(x), len(y))) + 1
    return flips / max(compared, 1)


def valid_rate(manifest: dict) -> float:
    """Fraction of prompts whose completion the numbers filter accepted (format intact)."""
    return manifest["n_valid"] / max(manifest["n_prompts"], 1)


def sweep_coeffs(
    lm: LoadedModel, base: dict, coeffs: list[float], work: Path, n: int, task: Any, seed: int
) -> list[dict]:
    """Changed-token fraction and valid rate of the sae teacher at each coeff, vs plain."""
    plain, man = generate(lm, {"kind": "plain"}, work / "plain.jsonl", n, task, seed)
    out = [{"coeff": 0.0, "flip_rate": 0.0, "changed_tokens": 0.0, "valid": valid_rate(man)}]
    for c in coeffs:
        rows, man = generate(lm, {**base, "coeff": c}, work / f"coeff-{c:g}.jsonl", n, task, seed)
        flips, changed = flip_rate(rows, plain), changed_fraction(rows, plain)
        out.append(
            {
                "coeff": c,
                "flip_rate": round(flips, 4),
                "changed_tokens": round(changed, 4),
                "valid": valid_rate(man),
            }
        )
        print(f"coeff {c:g}: {out[-1]}", flush=True)
    return out


def choose_coeff(sweep: list[dict], min_flip: float) -> float:
    """The smallest coeff whose flip rate is >= min_flip and that keeps the format (a valid
    rate >= 0.9 x the plain model's, sweep[0]); else the biggest flip rate that keeps it."""
    keeps = 0.9 * sweep[0]["valid"]
    ok = [r for r in sweep[1:] if r["valid"] >= keeps] or sweep[1:]
    big = [r for r in ok if r["flip_rate"] >= min_flip]
    return (big[0] if big else max(ok, key=lambda r: r["flip_rate"]))["coeff"]


def effect_ranks(lm: LoadedModel, sae: SAE, v: torch.Tensor, latents: dict, n: int) -> dict:
    """Rank of each latent by the fitted vector's corpus latent-effect (sae_effects)."""
    try:
        from steerdiff.interpret.sae_effects import latent_effects
    except ImportError:
        return {
            "available": False,
            "why": "not available yet: steerdiff.interpret.sae_effects is not in this checkout",
        }
    eff = latent_effects(lm, sae, vectors=VectorSet({sae.hook: v}), n_texts=n, progress=True)
    ranks = {
        f"{name}_{where}": eff.rank(j, where=where)
        for name, j in latents.items()
        for where in ("all", "first_k")
    }
    return {"available": True, "n_texts": eff.n_texts, "n_tokens": eff.n_tokens, **ranks}


def run(
    args: Any, lm: LoadedModel, demo: Any, work: Path, n_prompts: int, n_sweep: int, n_texts: int
) -> dict:
    """Sweep (unless --coeff), generate, fit, decompose: the result dict."""
    task = demo.task
    if args.sae:
        sae_path, sae_kind = args.sae, "given"
    else:
        sae_path = str(random_sae(lm, DEFAULT_HOOK, 8, args.seed, work / "random_sae"))
        sae_kind = (
            f"random (seed {args.seed}, unit-norm decoder rows, W_enc = W_dec^T, 8x; not kept)"
        )
    sae = load_sae(sae_path, lm)
    rng = random.Random(args.seed)
    latent = args.latent if args.latent is not None else rng.randrange(sae.d_sae)
    control = rng.choice([i for i in range(sae.d_sae) if i != latent])
    base = {"kind": "sae", "sae": sae_path, "latent": latent, "positions": "all"}
    sweep: list[dict] = []
    if args.coeff is None:
        coeffs = [float(c) for c in args.coeffs.split(",")]
        sweep = sweep_coeffs(lm, base, coeffs, work, n_sweep, task, args.seed)
    coeff = args.coeff if args.coeff is not None else choose_coeff(sweep, args.min_flip)
    print(f"SAE {sae_path} ({sae_kind}), latent {latent}, coeff {coeff:g}", flush=True)
    data = work / "data.jsonl"
    rows, manifest = generate(lm, {**base, "coeff": coeff}, data, n_prompts, task, args.seed + 1)
    spec = demo.fits[0]  # "vector-at-steered-hook"
    update: dict[str, Any] = {"hooks": [sae.hook], "progress": True}
    if args.objective:  # e.g. "online": distillation on the teacher's full distribution
        update["objective"] = args.objective
    cfg = spec.fit_config(0).model_copy(update=update)
    if args.default_fit:  # steerdiff's default fit (issue 18) instead of the demo's
        cfg = FitConfig(**update)
    res = fit(lm, data, cfg)
    v = res.vectors[sae.hook].float().cpu()
    d = decompose_vector(sae, v)
    result = {
        "sae": {"path": sae_path, "kind": sae_kind, "hook": sae.hook, "d_sae": sae.d_sae},
        "sae_sha256": sae.source.get("sha256"),
        "latent": latent,
        "latent_choice": "given" if args.latent is not None else f"random (seed {args.seed})",
        "coeff": coeff,
        "coeff_sweep": sweep,
        "coeff_rule": f"smallest coeff with flip_rate >= {args.min_flip} and valid >= 0.9 x plain",
        "n_rows": len(rows),
        "n_prompts": n_prompts,
        "valid_rate": valid_rate(manifest),
        "fit": {
            "name": "default" if args.default_fit else spec.name,
            **cfg.model_dump(include={"objective", "lr", "lr_units", "epochs"}),
        },
        "gap_closed": res.gap_closed,
        "planted": {
            "rank_by_cosine": d.rank(latent),
            "cosine": float(d.cosine[latent]),
            "cosine_direct": cosine(v, sae.W_dec[latent]),
        },
        "control": {
            "latent": control,
            "rank_by_cosine": d.rank(control),
            "cosine": float(d.cosine[control]),
        },
        "top_by_cosine": d.top(5),
        "fitted_norm": float(v.norm()),
        "latent_effect": effect_ranks(lm, sae, v, {"planted": latent, "control": control}, n_texts),
        "model": lm.spec,
        "dtype": dtype_name(lm.model.dtype),
        "quick": args.quick,
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sae", help="SAE for the embedded model (default: a random one)")
    ap.add_argument("--latent", type=int, help="planted latent (default: random, --seed)")
    ap.add_argument("--coeff", type=float, help="steering coefficient (default: swept)")
    ap.add_argument("--coeffs", default="4,8,16,32,64,128", help="coefficients the sweep tries")
    ap.add_argument("--min-flip", type=float, default=0.25, help="sweep: per-token flip rate")
    ap.add_argument("--n-prompts", type=int, help="rows of the teacher's dataset (default 160)")
    ap.add_argument("--n-sweep", type=int, help="prompts per coeff in the sweep (default 32)")
    ap.add_argument("--n-texts", type=int, help="corpus texts for latent effects (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--objective", help="fit objective (default: the demo fit's, distill)")
    ap.add_argument(
        "--default-fit", action="store_true", help="FitConfig's defaults, not the demo fit's"
    )
    ap.add_argument("--tag", default="", help="results file suffix (sae_ground_truth_TAG.json)")
    ap.add_argument("--quick", action="store_true", help="small sizes (development)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    demo = load_config(demo_config_path())
    task = demo.task
    n_prompts = args.n_prompts or (40 if args.quick else task.n_prompts)
    n_sweep = args.n_sweep or (12 if args.quick else 32)
    n_texts = args.n_texts or (24 if args.quick else 200)
    lm = load_model(demo.model)
    with tempfile.TemporaryDirectory(prefix="bench_sae_") as tmp:
        result = run(args, lm, demo, Path(tmp), n_prompts, n_sweep, n_texts)
    result["seconds"] = round(time.time() - t0, 1)
    RESULTS.mkdir(exist_ok=True)
    name = (
        "sae_ground_truth" + (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else "")
    )
    out = RESULTS / f"{name}.json"
    atomic_write_json(out, result)
    planted, control = result["planted"], result["control"]
    print(
        f"planted latent {result['latent']}: rank {planted['rank_by_cosine']}/"
        f"{result['sae']['d_sae']} by cosine ({planted['cosine']:.3f}); control latent "
        f"{control['latent']}: rank {control['rank_by_cosine']}; latent effect: "
        f"{result['latent_effect']}; {out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
