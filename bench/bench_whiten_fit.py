"""Issue 16: a vector fit with vs without a whitened-norm penalty or cap (fit.whitened).

Data: the demo's steered owl teacher (bench/_owl.py: SmolLM2-135M-Instruct + 2.0 x the owl
contrast vector at blocks.24.hook_resid_post, all positions) writing constrained number
lists with its top-20 log-probs (the cached n320/t48 set). One vector fitted at the
teacher's hook with the same settings (top-k distillation, Adam, lr 0.05 in activation
units, cosine schedule, a fixed number of epochs, no convergence stop), as:

  plain        no whitening
  penalty f    loss += lambda ||v||_M^2, lambda = f x (the plain fit's base KL) / ||v_T||_M^2:
               at the teacher vector's whitened norm the penalty is f x the base model's KL
  cap          whiten_max_norm = ||v_T||_M (the teacher vector's own Mahalanobis norm)
  cap / 2      whiten_max_norm = half the plain fit's ||v||_M (a cap that binds)

||.||_M is measured in a Ledoit-Wolf Gaussian of the hook's activations on 200 texts of the
offline corpus (whiten.fit_gaussian). For each fit: the held-out top-k KL gap closed
(1 - KL_fitted / KL_base, bootstrap 95% CI over validation rows, from the fit itself),
coherence (KL(base || base + v) on neutral prompts along the base model's greedy responses,
evals.scoring.CoherenceProbe; mean and 95% CI over prompts), the owl share (the exact
preference scorer, 50 questions (--quick: 20), 95% CI over questions; paired difference with the plain
fit on the same questions), the vector's Mahalanobis and L2 norms, and its cosine with the
teacher's vector. The base model and the teacher are measured alongside in the same run.

Resumable: each fit's figures are kept in bench/results/.cache/whiten_fit[_quick]/ and a
rerun skips the fits already there (--fresh: start again).

Usage: OMP_NUM_THREADS=1 python bench/bench_whiten_fit.py [--quick] [--penalties 0.1,1,10]
  writes bench/results/whiten_fit.json/.png (--quick: whiten_fit_quick.json/.png)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _owl  # noqa: E402
from _owl import COEFF, HOOK, Clock, say  # noqa: E402

N_QUESTIONS = 50  # --quick: 20


def config(quick: bool, **kw: Any) -> Any:
    return _owl.distill_config(quick, epochs=3, **kw)


def gaussian(lm: Any, n_texts: int) -> tuple[Any, Path]:
    """The Ledoit-Wolf Gaussian at HOOK on n_texts corpus texts (float32 model), cached."""
    from steerdiff.interpret.corpus import load_corpus
    from steerdiff.whiten import Gaussian, fit_gaussian

    path = _owl.CACHE / f"whiten_f32_{HOOK}_n{n_texts}.safetensors"
    if path.exists():
        return Gaussian.load(path), path
    g = fit_gaussian(lm, HOOK, load_corpus(n=n_texts).texts)
    _owl.CACHE.mkdir(parents=True, exist_ok=True)
    return g, g.save(path)


class Coherence:
    """KL(base || base + v) per neutral prompt (one CoherenceProbe each), mean and 95% CI."""

    def __init__(self, lm: Any, n_prompts: int, n_tokens: int = 16):
        from steerdiff.chat import read_lines_resource
        from steerdiff.evals.scoring import CoherenceProbe

        prompts = read_lines_resource("neutral_prompts.txt")[:n_prompts]
        self.probes = [CoherenceProbe(lm, [p], n_tokens) for p in prompts]

    def __call__(self, v: torch.Tensor) -> dict[str, Any]:
        from steerdiff.evals.steering import Steering
        from steerdiff.intervals import mean_ci95

        s = Steering({HOOK: v})
        kls = [float(p.kl(s)[0]) for p in self.probes]
        m, ci = mean_ci95(kls)
        return {
            "kl": round(m, 5),
            "ci95": [round(ci[0], 5), round(ci[1], 5)],
            "n_prompts": len(kls),
        }


def measure(
    lm: Any, v: torch.Tensor, g: Any, teacher_v: torch.Tensor, coherence: Coherence, n_q: int
) -> dict[str, Any]:
    """Norms, cosine with the teacher, coherence and owl share of base + v."""
    return {
        "mahalanobis_norm": round(float(g.mahalanobis_norm(v)), 4),
        "l2_norm": round(float(v.norm()), 4),
        "cosine_teacher": round(_owl.cosine(v, teacher_v), 4),
        "coherence": coherence(v),
        "owl": _owl.owl_share(lm, n_q, {HOOK: v}),
    }


def run_fit(
    lm: Any, rows: list[dict], cfg: Any, name: str, folder: Path, ctx: dict
) -> dict[str, Any]:
    """One fit and its figures; kept in folder/name.json (a rerun reads it back)."""
    name_file = name.replace("|", "").replace("/", "_").replace(" ", "_")
    from steerdiff.fit import fit

    done = folder / f"{name_file}.json"
    if done.exists():
        say(f"{name}: done earlier ({done})")
        return json.loads(done.read_text())
    clock = Clock()
    res = fit(lm, rows, cfg)
    v = res.vectors[HOOK].float()
    s = res.summary()
    row: dict[str, Any] = {
        "name": name,
        "whiten_penalty": cfg.whiten_penalty,
        "whiten_max_norm": cfg.whiten_max_norm,
        "kl_gap_closed": s.get("kl_gap_closed"),
        "kl_gap_closed_ci": s.get("kl_gap_closed_ci"),
        "val_kl": s.get("val_kl"),
        "base_val_kl": s.get("base_val_kl"),
        "steps": res.steps,
        "final_penalty": res.metrics[-1].get("penalty"),
        "whitened_norms": s.get("whitened_norms"),
        **measure(lm, v, ctx["g"], ctx["teacher_v"], ctx["coherence"], ctx["n_q"]),
        **clock.figures(),
    }
    _owl.write_json(done, row)
    return row


def table(rows: list[dict], teacher: dict, base: dict) -> str:
    head = (
        f"{'fit':<14} {'lambda':>9} {'KL gap closed [95% CI]':>26} {'coherence KL [95% CI]':>28} "
        f"{'owl share [95% CI]':>24} {'owl - plain [95% CI]':>26} {'|v|_M':>7} {'|v|':>7} "
        f"{'cos T':>6}"
    )
    lines = [head]

    def ci(x: Any, d: int = 3) -> str:
        return f"[{x[0]:.{d}f}, {x[1]:.{d}f}]" if x else ""

    for r in [base, teacher, *rows]:
        gap = r.get("kl_gap_closed")
        gap_s = f"{gap:.3f} {ci(r.get('kl_gap_closed_ci'))}" if gap is not None else "-"
        coh = r["coherence"]
        owl = r["owl"]
        vs = r.get("owl_vs_plain")
        lam = r.get("whiten_penalty")
        vs_s = f"{vs['diff']:+.3f} {ci(vs['ci95'])}" if vs else "-"
        lines.append(
            f"{r['name']:<14} {(f'{lam:.3g}' if lam else '-'):>9} {gap_s:>26} "
            f"{coh['kl']:.4f} {ci(coh['ci95'], 4):>18} "
            f"{owl['owl_share']:.3f} {ci(owl['ci95']):>16} "
            f"{vs_s:>26} "
            f"{r['mahalanobis_norm']:>7.2f} {r['l2_norm']:>7.2f} "
            f"{r.get('cosine_teacher', float('nan')):>6.3f}"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """Four panels, one bar per fit (base and teacher as reference lines), 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from steerdiff.io import atomic_path

    fits = result["fits"]
    names = [f["name"] for f in fits]
    xs = list(range(len(fits)))
    panels = [
        ("held-out top-k KL gap closed", lambda f: (f["kl_gap_closed"], f["kl_gap_closed_ci"])),
        (
            "coherence: KL on neutral prompts",
            lambda f: (f["coherence"]["kl"], f["coherence"]["ci95"]),
        ),
        ("owl share (exact preference)", lambda f: (f["owl"]["owl_share"], f["owl"]["ci95"])),
        ("Mahalanobis norm of v", lambda f: (f["mahalanobis_norm"], None)),
    ]
    refs = {
        "coherence: KL on neutral prompts": [("teacher", result["teacher"]["coherence"]["kl"])],
        "owl share (exact preference)": [
            ("base", result["base"]["owl"]["owl_share"]),
            ("teacher", result["teacher"]["owl"]["owl_share"]),
        ],
        "Mahalanobis norm of v": [("teacher", result["teacher"]["mahalanobis_norm"])],
    }
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    for ax, (title, get) in zip(axes, panels, strict=True):
        vals = [get(f) for f in fits]
        m = [v[0] if v[0] is not None else float("nan") for v in vals]
        err = [
            [v[0] - v[1][0] if v[1] else 0 for v in vals],
            [v[1][1] - v[0] if v[1] else 0 for v in vals],
        ]
        ax.bar(xs, m, yerr=err, capsize=3, color="tab:blue")
        for (label, y), style in zip(refs.get(title, []), ("--", ":"), strict=False):
            ax.axhline(y, color="k", ls=style, lw=0.8, label=label)
        if title in refs:
            ax.legend(fontsize=7)
        ax.set_xticks(xs, names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.suptitle(
        f"{result['model']} ({result['dtype']}), one vector at {HOOK}: plain vs whitened "
        "penalty / cap (95% CIs)",
        fontsize=10,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    say(f"wrote {path}")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke check, < 3 min)")
    ap.add_argument("--penalties", default=None, help="comma-separated f values (see above)")
    ap.add_argument("--fresh", action="store_true", help="ignore fits done earlier")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from steerdiff.io import provenance
    from steerdiff.models import load_model

    quick = a.quick
    total = Clock()
    n_train, n_val = (16, 8) if quick else (128, 32)
    n_q = 20 if quick else N_QUESTIONS
    fs = (
        [float(x) for x in a.penalties.split(",")]
        if a.penalties
        else ([10.0] if quick else [1.0, 10.0, 100.0])
    )
    n_texts, n_prompts = (40, 2) if quick else (200, 8)
    name = "whiten_fit_quick" if quick else "whiten_fit"
    out = Path(a.out or _owl.RESULTS / f"{name}.json")
    folder = _owl.CACHE / name
    if a.fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)

    lm = load_model(dtype="float32")
    say(f"model {lm.spec} dtype {lm.model.dtype}")
    teacher_v = COEFF * _owl.owl_vector(lm)
    data = _owl.teacher_data(lm, 320, max_new_tokens=48)  # cached: copied from main's cache
    rows = _owl.rows(data, n_train, n_val)
    g, g_path = gaussian(lm, n_texts)
    r_t = float(g.mahalanobis_norm(teacher_v))
    say(
        f"{len(rows)} rows ({n_val} validation); teacher |v|_M {r_t:.3f}, |v| {teacher_v.norm():.2f}"
    )
    coherence = Coherence(lm, n_prompts)
    ctx = {"g": g, "teacher_v": teacher_v, "coherence": coherence, "n_q": n_q}

    base = {
        "name": "base",
        "coherence": {"kl": 0.0, "ci95": [0.0, 0.0]},
        "owl": _owl.owl_share(lm, n_q),
        "mahalanobis_norm": 0.0,
        "l2_norm": 0.0,
    }
    teacher = {"name": "teacher", **measure(lm, teacher_v, g, teacher_v, coherence, n_q)}
    whiten = {"whiten": str(g_path)}
    plain = run_fit(lm, rows, config(quick, **whiten), "plain", folder, ctx)
    base_kl = plain["base_val_kl"]
    fits = [plain]
    for f in fs:
        lam = f * base_kl / r_t**2
        cfg = config(quick, whiten_penalty=lam, **whiten)
        fits.append(run_fit(lm, rows, cfg, f"penalty f={f:g}", folder, ctx))
    cfg = config(quick, whiten_max_norm=r_t, **whiten)
    fits.append(run_fit(lm, rows, cfg, "cap |v_T|_M", folder, ctx))
    r_half = 0.5 * plain["mahalanobis_norm"]  # a cap that binds: half the plain fit's norm
    cfg = config(quick, whiten_max_norm=r_half, **whiten)
    fits.append(run_fit(lm, rows, cfg, "cap |v_plain|_M/2", folder, ctx))
    for r in fits[1:]:
        r["owl_vs_plain"] = _owl.paired(r["owl"], plain["owl"])

    result = {
        "model": lm.spec,
        "dtype": str(lm.model.dtype).replace("torch.", ""),
        "hook": HOOK,
        "rows": {"train": n_train, "val": n_val, "data": str(data)},
        "gaussian": {
            "file": str(g_path),
            "n_texts": n_texts,
            "n_tokens": g.n_tokens,
            "shrinkage": g.shrinkage,
        },
        "penalty_fractions": fs,
        "lambda_rule": "lambda = f x base_val_kl (plain fit) / teacher_mahalanobis_norm^2",
        "config": _owl.describe(config(quick)),
        "base": base,
        "teacher": {**teacher, "coeff": COEFF},
        "fits": fits,
        "provenance": provenance(lm, config=config(quick).model_dump(), seed=0),
        **total.figures(),
    }
    print(table(fits, result["teacher"], base))
    _owl.write_json(out, result)
    plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
