"""Issue 15: fit the demo's owl data in an SAE's latent basis vs an ordinary vector fit.

Data: the demo's steered owl teacher (bench/_owl.py: SmolLM2-135M-Instruct + 2.0 x the owl
contrast vector at blocks.24.hook_resid_post, all positions) writing constrained number
lists with its top-20 log-probs. Fits, all at blocks.24.hook_resid_post with the same
settings (top-k distillation, Adam, lr 0.05 in activation units, cosine schedule, a fixed
number of epochs): (a) an ordinary vector; (b) a code z over the SAE's latents, v = z @ W_dec,
with the L1 penalty l1 x sum_i |z_i| ||W_dec[i]|| at each of --l1 values. Reported: the
validation KL gap closed (1 - KL_fitted / KL_base on the held-out rows) and CE, the code's L0
(latents >= 1% of its largest weighted coefficient), its top latents, the ordinary vector's
top latents by cosine and by pullback W_dec v, their overlaps, cosine(v_latent, v_ordinary),
and each vector's cosine with the teacher's.

--sae: the SAE at blocks.24.hook_resid_post (a SAELens folder, e.g. from `steerdiff sae
train`). Without it a random SAE (4608 unit-norm decoder rows, seed 0) is made and said so in
the JSON: the mechanics only, its latents mean nothing.

Usage: python bench/bench_sae_fit.py [--quick] [--sae PATH]
  writes bench/results/sae_fit.json (--quick: sae_fit_quick.json)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _owl  # noqa: E402
from _owl import COEFF, HOOK, Clock, say  # noqa: E402


def random_sae(folder: Path, d_sae: int = 4608, d_in: int = 576, seed: int = 0) -> Path:
    """A random SAE at HOOK (unit-norm decoder rows, encoder = decoder^T), saved once."""
    from steerdiff.sae import SAE, save_sae

    if (folder / "cfg.json").exists():
        return folder
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    sae = SAE(w_dec.T.clone(), torch.zeros(d_sae), w_dec, torch.zeros(d_in), hook=HOOK)
    return save_sae(sae, folder, extra={"steerdiff": {"made_by": "bench_sae_fit random_sae"}})


def config(quick: bool, **kw: Any) -> Any:
    return _owl.distill_config(quick, epochs=4, **kw)


def figures(res: Any, clock: Clock) -> dict[str, Any]:
    s = res.summary()
    keep = ("fitted_val_loss", "base_val_loss", "val_kl", "base_val_kl", "kl_gap_closed")
    out = {k: s.get(k) for k in keep}
    out["kl_gap_closed_ci"] = s.get("kl_gap_closed_ci")
    out["steps"] = res.steps
    return {**out, **clock.figures()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke check)")
    ap.add_argument("--sae", default=None, help="SAE at blocks.24.hook_resid_post")
    ap.add_argument("--l1", default=None, help="comma-separated l1 values")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from steerdiff.fit import fit
    from steerdiff.fit.latent import code_summary, compare_with_pullback, load_latent_code
    from steerdiff.interpret.sae_decompose import decompose_vector
    from steerdiff.sae import load_sae

    quick = a.quick
    n_prompts, n_train, n_val = (48, 32, 8) if quick else (320, 256, 32)
    l1s = (
        [float(x) for x in a.l1.split(",")]
        if a.l1
        else ([1e-4, 1e-3, 1e-2] if quick else [1e-5, 3e-5, 1e-4, 3e-4, 1e-3])
    )
    out = Path(a.out or _owl.RESULTS / ("sae_fit_quick.json" if quick else "sae_fit.json"))
    sae_path = Path(a.sae) if a.sae else random_sae(_owl.CACHE / "random_sae_b24")
    lm = _owl.load()
    sae = load_sae(sae_path, lm)
    teacher_v = COEFF * _owl.owl_vector(lm)
    data = _owl.teacher_data(lm, n_prompts, max_new_tokens=32 if quick else 48)
    rows = _owl.rows(data, n_train, n_val)
    say(f"{len(rows)} rows ({n_val} validation); SAE {sae_path} ({sae.d_sae} latents)")

    result: dict[str, Any] = {
        "model": lm.spec,
        "dtype": str(lm.model.dtype),
        "hook": HOOK,
        "sae": {
            "path": str(sae_path),
            "random": a.sae is None,
            "sha256": sae.source.get("sha256"),
            "d_sae": sae.d_sae,
        },
        "rows": {"train": len(rows) - n_val, "val": n_val, "data": str(data)},
        "teacher": {"coeff": COEFF, "norm": float(teacher_v.norm())},
        "config": _owl.describe(config(quick)),
    }
    clock = Clock()
    res = fit(lm, rows, config(quick))
    v_ord = res.vectors[HOOK].float()
    ordinary = figures(res, clock)
    dec = decompose_vector(sae, v_ord)
    ordinary.update(
        norm=float(v_ord.norm()),
        cosine_teacher=_owl.cosine(v_ord, teacher_v),
        top_cosine=dec.top(10),
        teacher_top_cosine=decompose_vector(sae, teacher_v).top(10),
    )
    result["ordinary"] = ordinary
    say(f"ordinary: {ordinary['kl_gap_closed']} KL gap closed, |v| {ordinary['norm']:.2f}")

    latent = []
    for l1 in l1s:
        clock = Clock()
        folder = _owl.CACHE / f"sae_fit_l1_{l1:g}"
        cfg = config(quick, basis="sae", sae=str(sae_path), l1=l1)
        res = fit(lm, rows, cfg, out_dir=folder, resume=False)
        codes, _ = load_latent_code(folder)
        z = codes[HOOK]
        v = res.vectors[HOOK].float()
        row = {"l1": l1, **figures(res, clock)}
        row.update(
            penalty=res.metrics[-1].get("penalty"),
            norm=float(v.norm()),
            cosine_teacher=_owl.cosine(v, teacher_v),
            code=code_summary(z, sae),
            vs_ordinary=compare_with_pullback(z, v_ord, sae, k=10),
        )
        latent.append(row)
        c = row["vs_ordinary"]
        say(
            f"l1 {l1:g}: KL gap closed {row['kl_gap_closed']}, L0 {row['code']['l0']}, "
            f"cos(v_latent, v_ordinary) {c['cosine']:.3f}, top-10 overlap (cosine) "
            f"{c['overlap_cosine']:.1f}"
        )
    result["latent"] = latent
    _owl.write_json(out, result)


if __name__ == "__main__":
    main()
