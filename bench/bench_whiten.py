"""Bench: whitened steering strength vs L2 strength, and the whitened direction (issue 16, item 1).

Model: the embedded SmolLM2-135M-Instruct (float32 on CPU). Vector: the owl trait contrast
vector (system prompt "You love owls..." vs none, readout "last", 30 contrast questions) at
blocks.{L}.hook_resid_post for L in LAYERS. A Gaussian (mean, Ledoit-Wolf covariance) is fitted
per hook on the offline corpus (steerdiff.whiten.gaussians_for).

For each layer and direction d in {v, cov @ v} (both rescaled to 1 whitened unit,
||d||_M = 1: steerdiff.whiten.whitened_units) we run a curve over whitened strengths c
(a geometric grid), recording per question the owl share (exact scorer, evals.FastScorer,
Q animal questions) and per neutral prompt the coherence KL (evals.FastCoherence: KL(unsteered
|| steered) along greedy unsteered responses, nats per token).

(a) Units. At one hook a change of units is only a rescaling of the coefficient (c whitened
units = c / ||v||_M in L2 coefficient), so at matched owl share the KL is the same: checked
numerically (the same cell steered through both routes). Across layers: the strength needed
for an owl-share gain of +t, in whitened units c and in L2 units relative to the hook's
activation RMS (s = |coeff v| / rms, rms^2 = E|h|^2 = |mean|^2 + tr cov); the spread across
layers is the SD of log2(needed strength) (octaves; scale-free, so the units compare), and
the owl gain / KL at one fixed nominal strength per unit system (the geometric mean of the
layers' needed strengths for KL = 0.3) spread across layers. The owl share moves only at late
layers on this model, so "needed" is also taken for coherence-KL targets (0.1, 0.3, 1 nats),
which every layer reaches. Whitened units are also computed under an unshrunk covariance
("whitened_none", same tokens) since the Ledoit-Wolf weight differs a lot between layers.

(b) Direction. Under a whitened budget ||d||_M = c the direction with the most trait per unit
length (max v.d) is d ∝ cov @ v. At matched owl share (each curve interpolated, linearly in
log c, to the first crossing of unsteered + t), KL of cov @ v minus KL of v, per layer.

CIs: a two-way percentile bootstrap (questions and neutral prompts resampled independently,
the same resample for every curve so differences stay paired), 2,000 resamples (500 quick);
a resample whose curve never reaches the target is dropped (the kept count is recorded).

Run: OMP_NUM_THREADS=1 python3 bench/bench_whiten.py [--quick]
Writes bench/results/whiten.json and whiten.png (--quick: whiten_quick.*).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from _owl import RESULTS, Clock, load, say, write_json

from steerdiff import io
from steerdiff.chat import read_lines_resource
from steerdiff.evals import (
    CoherenceProbe,
    FastCoherence,
    FastScorer,
    load_category,
    question_prompts,
)
from steerdiff.extract import default_contrast_questions, trait_vectors
from steerdiff.interpret.corpus import load_corpus
from steerdiff.intervals import mean_ci95
from steerdiff.whiten import gaussians_for, vector_figures, whitened_units

TARGETS = (0.05, 0.10, 0.20)  # owl-share gains over unsteered
KL_TARGETS = (0.1, 0.3, 1.0)  # coherence KL, nats per token
FIXED_KL = 0.3


def curve(scorer, cohs, layer, d, grid, ti, base_q, stop_gain, stop_kl):
    """Owl share per question [Q, n] and KL per prompt [K, n] along the grid (stops one point
    after the mean gain passes stop_gain or the KL passes stop_kl; later points NaN)."""
    share = np.full((len(base_q), len(grid)), np.nan)
    kl = np.full((len(cohs), len(grid)), np.nan)
    for j, c in enumerate(grid):
        lp = scorer.logprobs(layer, d, c)  # [Q, C]
        share[:, j] = torch.softmax(lp, -1)[:, ti].numpy()
        kl[:, j] = [co.kl(layer, d, c) for co in cohs]
        if share[:, j].mean() - base_q.mean() > stop_gain or kl[:, j].mean() > stop_kl:
            break
    return share, kl


def crossing(logc: np.ndarray, y: np.ndarray, t: float) -> float:
    """log c where y first reaches t (linear in log c between grid points); NaN if never."""
    for j in range(len(y)):
        if np.isnan(y[j]):
            break
        if y[j] >= t:
            if j == 0:
                return float(logc[0]) if y[0] == t else float("nan")
            f = (t - y[j - 1]) / (y[j] - y[j - 1])
            return float(logc[j - 1] + f * (logc[j] - logc[j - 1]))
    return float("nan")


def at(logc: np.ndarray, y: np.ndarray, x: float) -> float:
    """y interpolated at log c = x (NaN outside the measured points)."""
    ok = ~np.isnan(y)
    if math.isnan(x) or x < logc[ok][0] or x > logc[ok][-1]:
        return float("nan")
    return float(np.interp(x, logc[ok], y[ok]))


def stats(curves, base_q, logc, offs, qi, ki):
    """Figures of one (resampled) draw: qi question rows, ki prompt rows.
    curves[(layer, dir)] = (share [Q, n], kl [K, n]); offs[unit][layer] = what log2 of the
    whitened (Ledoit-Wolf) c of v adds up to in that unit: 0 for "whitened", log2 of the factor
    to relative L2 strength s for "l2_rel", log2(|v|_M,none / |v|_M,LW) for "whitened_none"."""
    b = base_q[qi].mean()
    out: dict = {}
    layers = sorted({la for la, _ in curves})
    for la in layers:
        for dname in ("v", "cov_v"):
            share, kl = curves[(la, dname)]
            gain = share[qi].mean(0) - b
            klm = kl[ki].mean(0)
            for t in TARGETS:  # matched owl share: KL there
                x = crossing(logc, gain, t)
                out[(la, dname, t, "logc")] = x
                out[(la, dname, t, "kl")] = at(logc, klm, x)
            for k in KL_TARGETS:  # matched KL: owl gain there
                x = crossing(logc, klm, k)
                out[(la, dname, ("kl", k), "logc")] = x
                out[(la, dname, ("kl", k), "gain")] = at(logc, gain, x)
            out[(la, dname, "gain")] = gain
            out[(la, dname, "klcurve")] = klm
        for t in TARGETS:
            out[("diff", la, t)] = out[(la, "cov_v", t, "kl")] - out[(la, "v", t, "kl")]
        for k in KL_TARGETS:
            out[("gdiff", la, k)] = (
                out[(la, "cov_v", ("kl", k), "gain")] - out[(la, "v", ("kl", k), "gain")]
            )
    off = {u: np.array([o[la] for la in layers]) for u, o in offs.items()}
    for t in [*TARGETS, *(("kl", k) for k in KL_TARGETS)]:
        need_w = np.array([out[(la, "v", t, "logc")] for la in layers])  # log2 whitened c
        ok = ~np.isnan(need_w)
        n_ok = int(ok.sum())
        for u, o in off.items():
            a = need_w + o
            out[("sd_octaves", u, t)] = float(np.std(a[ok], ddof=1)) if n_ok >= 2 else float("nan")
        for u in off:
            if u != "l2_rel":
                d = out[("sd_octaves", u, t)] - out[("sd_octaves", "l2_rel", t)]
                out[("sd_octaves", f"{u}-l2_rel", t)] = d
        out[("sd_octaves", "n_layers", t)] = n_ok
    # one fixed nominal strength per unit system: the geometric mean of the layers' needs
    # for KL = FIXED_KL nats; the owl gain and KL it gives at each layer
    need_w = np.array([out[(la, "v", ("kl", FIXED_KL), "logc")] for la in layers])
    if not np.isnan(need_w).any():
        for unit, o in off.items():
            x0 = float((need_w + o).mean())
            xs = list(x0 - o)  # back in log2 whitened (LW) c, per layer
            g = [at(logc, out[(la, "v", "gain")], x) for la, x in zip(layers, xs, strict=True)]
            k = [at(logc, out[(la, "v", "klcurve")], x) for la, x in zip(layers, xs, strict=True)]
            out[("fixed", unit, "gain_range")] = float(np.ptp(g))
            out[("fixed", unit, "kl_range")] = float(np.ptp(k))
            out[("fixed", unit, "log_kl_sd")] = float(np.std(np.log2(k), ddof=1))
            out[("fixed", unit, "gains")] = g
            out[("fixed", unit, "kls")] = k
            out[("fixed", unit, "log2_nominal")] = x0
    return out


def boot(curves, base_q, logc, offs, keys, n_boot, seed=0):
    """Percentile 95% CI per key over two-way resamples; (lo, hi, kept)."""
    rng = np.random.default_rng(seed)
    q, k = len(base_q), next(iter(curves.values()))[1].shape[0]
    vals = {key: [] for key in keys}
    for _ in range(n_boot):
        s = stats(curves, base_q, logc, offs, rng.integers(0, q, q), rng.integers(0, k, k))
        for key in keys:
            vals[key].append(s.get(key, float("nan")))
    ci = {}
    for key, vs in vals.items():
        a = np.array(vs, dtype=float)
        a = a[np.isfinite(a)]
        ci[key] = (
            (float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5)), len(a))
            if len(a)
            else (float("nan"), float("nan"), 0)
        )
    return ci


def plot(res: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = res["layers"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    cmap = plt.get_cmap("viridis")
    for i, la in enumerate(layers):
        col = cmap(i / max(1, len(layers) - 1))
        for dname, ls in (("v", "-"), ("cov_v", "--")):
            c = res["curves"][str(la)][dname]
            ax[0].plot(c["c"], c["owl_gain"], ls, color=col, marker=".", label=f"L{la} {dname}")
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("whitened strength c (data SDs along the direction)")
    ax[0].set_ylabel("owl share - unsteered")
    ax[0].legend(fontsize=7)
    ax[0].set_title("owl gain vs whitened strength")
    x = np.arange(len(layers))
    t = "kl=0.3"
    for off, dname in ((-0.15, "v"), (0.15, "cov_v")):
        m = [res["matched"][str(la)][t][dname]["value"] for la in layers]
        lo = [res["matched"][str(la)][t][dname]["ci95"][0] for la in layers]
        hi = [res["matched"][str(la)][t][dname]["ci95"][1] for la in layers]
        err = np.array([np.subtract(m, lo), np.subtract(hi, m)])
        ax[1].bar(x + off, m, 0.3, yerr=np.nan_to_num(err), label=dname, capsize=3)
    ax[1].set_xticks(x, [f"L{la}" for la in layers])
    ax[1].set_ylabel("owl share gain at coherence KL = 0.3 nats/token")
    ax[1].set_title("(b) v vs cov@v at matched KL")
    ax[1].legend()
    for unit, mk in (("whitened", "o"), ("whitened_none", "^"), ("l2_rel", "s")):
        need = [res["needed"][str(la)]["kl=0.3"][unit] for la in layers]
        ref = np.nanmean(np.log2(need))
        ax[2].plot(layers, np.log2(need) - ref, marker=mk, label=unit)
    ax[2].axhline(0, color="grey", lw=0.5)
    ax[2].set_xlabel("layer")
    ax[2].set_ylabel("log2 strength for KL 0.3 (centred)")
    ax[2].set_title("(a) strength needed across layers")
    ax[2].legend()
    name = "SmolLM2-135M-Instruct" if res["model"] == "default" else res["model"]
    fig.suptitle(f"{name} ({res['dtype']}), owl vector (readout last)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    quick = args.quick
    clock = Clock()
    torch.manual_seed(0)
    layers = [12, 24] if quick else [6, 12, 18, 24]
    n_q, n_k, n_tok = (6, 3, 8) if quick else (20, 8, 16)
    n_texts, n_boot = (30, 500) if quick else (120, 2000)
    grid = 2.0 ** np.arange(-3, 8.01, 1.0 if quick else 0.5)  # whitened units 1/8 .. 256
    logc = np.log2(grid)

    lm = load()
    hooks = [f"blocks.{la}.hook_resid_post" for la in layers]
    cat = load_category("animals")
    ti = [c.lower() for c in cat.candidates].index("owl")
    t0 = time.perf_counter()
    vs = trait_vectors(
        lm, "owl", cat.name, "last", hooks, questions=default_contrast_questions()[:30]
    )["last"]
    texts = load_corpus(n=n_texts).texts
    cache = RESULTS / ".cache" / "whiten"
    gs = gaussians_for(lm, hooks, texts, max_tokens=64, cache_dir=cache)
    gs_none = gaussians_for(lm, hooks, texts, max_tokens=64, shrinkage="none", cache_dir=cache)
    say(f"vectors + Gaussians in {time.perf_counter() - t0:.0f} s")

    prompts = question_prompts(lm, cat.questions[:n_q], None)
    scorer = FastScorer(lm, prompts, cat.candidates)
    neutral = read_lines_resource("neutral_prompts.txt")[:n_k]
    cohs = [FastCoherence(CoherenceProbe(lm, [p], n_tok)) for p in neutral]
    base_q = torch.softmax(scorer.logprobs(layers[0], vs[hooks[0]], 0.0), -1)[:, ti].numpy()

    figs, conv, conv_none, curves = {}, {}, {}, {}
    for la, h in zip(layers, hooks, strict=True):
        g, v = gs[h], vs[h].float()
        f = vector_figures(g, v)
        rms = math.sqrt(float(g.mean @ g.mean) + float(torch.trace(g.cov)))
        f["activation_rms_norm"] = rms
        f["shrinkage"] = g.shrinkage
        f["n_tokens"] = g.n_tokens
        figs[la] = f
        # whitened c of v -> L2 coefficient c / |v|_M -> |coeff v| / rms = c |v| / (|v|_M rms)
        conv[la] = math.log2(f["l2_norm"] / (f["mahalanobis_norm"] * rms))
        f["mahalanobis_norm_no_shrinkage"] = float(gs_none[h].mahalanobis_norm(v))
        conv_none[la] = math.log2(f["mahalanobis_norm_no_shrinkage"] / f["mahalanobis_norm"])
        sv = (g.cov @ v.double()).float()
        dirs = whitened_units({h: v}, gs)[h], whitened_units({h: sv}, gs)[h]
        f["cos_v_cov_v"] = float(torch.nn.functional.cosine_similarity(v, sv, dim=0))
        for dname, d in zip(("v", "cov_v"), dirs, strict=True):
            t1 = time.perf_counter()
            curves[(la, dname)] = curve(scorer, cohs, la, d, grid, ti, base_q, 0.35, 3.0)
            n = int((~np.isnan(curves[(la, dname)][0][0])).sum())
            say(f"L{la} {dname}: {n} points in {time.perf_counter() - t1:.0f} s")

    # (a) the identity: the same cell through whitened units and through L2 units
    la, h = layers[-1], hooks[-1]
    c = 4.0
    k_l2 = c / figs[la]["mahalanobis_norm"]
    vw = whitened_units({h: vs[h].float()}, gs)[h]
    share_w = torch.softmax(scorer.logprobs(la, vw, c), -1)[:, ti]
    share_l = torch.softmax(scorer.logprobs(la, vs[h].float(), k_l2), -1)[:, ti]
    kl_w, kl_l = cohs[0].kl(la, vw, c), cohs[0].kl(la, vs[h].float(), k_l2)
    identity = {
        "layer": la,
        "whitened_c": c,
        "l2_coeff": k_l2,
        "max_abs_owl_share_diff": float((share_w - share_l).abs().max()),
        "kl_whitened": kl_w,
        "kl_l2": kl_l,
        "abs_kl_diff": abs(kl_w - kl_l),
    }
    say(f"identity check: {identity}")

    offs = {"whitened": dict.fromkeys(layers, 0.0), "whitened_none": conv_none, "l2_rel": conv}
    point = stats(curves, base_q, logc, offs, np.arange(n_q), np.arange(n_k))
    keys = [k for k in point if not isinstance(point[k], (list, np.ndarray))]
    ci = boot(curves, base_q, logc, offs, keys, n_boot)

    def fig(key):
        lo, hi, kept = ci[key]
        return {"value": point[key], "ci95": [lo, hi], "kept": kept}

    def tname(t) -> str:
        return f"kl={t[1]:g}" if isinstance(t, tuple) else f"owl+{t:g}"

    all_targets = [*TARGETS, *(("kl", k) for k in KL_TARGETS)]
    matched, needed = {}, {}
    for la in layers:
        matched[str(la)], needed[str(la)] = {}, {}
        for t in TARGETS:  # (b) at matched owl share: KL of each direction
            m = {
                d: {**fig((la, d, t, "kl")), "whitened_c": 2 ** point[(la, d, t, "logc")]}
                for d in ("v", "cov_v")
            }
            m["diff_cov_v_minus_v"] = fig(("diff", la, t))
            matched[str(la)][tname(t)] = m
        for k in KL_TARGETS:  # (b) at matched KL: owl gain of each direction
            t = ("kl", k)
            m = {
                d: {**fig((la, d, t, "gain")), "whitened_c": 2 ** point[(la, d, t, "logc")]}
                for d in ("v", "cov_v")
            }
            m["diff_cov_v_minus_v"] = fig(("gdiff", la, k))
            matched[str(la)][tname(t)] = m
        for t in all_targets:  # (a) the strength v needs, in both units
            w = 2 ** point[(la, "v", t, "logc")]
            needed[str(la)][tname(t)] = {u: w * 2 ** o[la] for u, o in offs.items()}
    uniform = {
        tname(t): {
            **{
                u: fig(("sd_octaves", u, t))
                for u in ("whitened", "whitened_none", "l2_rel")
                + ("whitened-l2_rel", "whitened_none-l2_rel")
            },
            "n_layers_reaching": point[("sd_octaves", "n_layers", t)],
        }
        for t in all_targets
    }
    fixed = {
        u: {
            "fixed_at": f"geometric mean over layers of the strength for KL = {FIXED_KL}",
            "nominal": 2 ** point[("fixed", u, "log2_nominal")],
            "owl_gain_per_layer": point[("fixed", u, "gains")],
            "kl_per_layer": point[("fixed", u, "kls")],
            "owl_gain_range": fig(("fixed", u, "gain_range")),
            "kl_range": fig(("fixed", u, "kl_range")),
            "log2_kl_sd": fig(("fixed", u, "log_kl_sd")),
        }
        for u in offs
        if ("fixed", u, "gains") in point
    }
    base_m, base_ci = mean_ci95(base_q.tolist())
    res = {
        "provenance": io.provenance(
            lm,
            config={
                "layers": layers,
                "n_questions": n_q,
                "n_neutral": n_k,
                "kl_tokens": n_tok,
                "corpus_texts": n_texts,
                "max_tokens": 64,
                "grid_whitened": grid.tolist(),
                "n_boot": n_boot,
                "quick": quick,
            },
            seed=0,
        ),
        "model": lm.spec,
        "dtype": str(lm.model.dtype).replace("torch.", ""),
        "layers": layers,
        "unsteered_owl_share": {"mean": base_m, "ci95": list(base_ci)},
        "vectors": {str(la): figs[la] for la in layers},
        "identity_check": identity,
        "matched": matched,
        "needed": needed,
        "uniformity_sd_octaves": uniform,
        "fixed_nominal": fixed,
        "curves": {
            str(la): {
                d: {
                    "c": grid.tolist(),
                    "owl_gain": (curves[(la, d)][0].mean(0) - base_q.mean()).tolist(),
                    "kl": curves[(la, d)][1].mean(0).tolist(),
                }
                for d in ("v", "cov_v")
            }
            for la in layers
        },
        "timing": clock.figures(),
    }
    name = "whiten_quick" if quick else "whiten"
    write_json(RESULTS / f"{name}.json", res)
    plot(res, RESULTS / f"{name}.png")
    say(f"unsteered owl share {base_m:.4f} [{base_ci[0]:.4f}, {base_ci[1]:.4f}]")
    for la in layers:
        f = figs[la]
        say(
            f"L{la}: |v| {f['l2_norm']:.2f} |v|_M {f['mahalanobis_norm']:.2f} spread "
            f"{f['spread']:.3f} rms {f['activation_rms_norm']:.1f} cos(v, cov v) "
            f"{f['cos_v_cov_v']:.3f}"
        )
        for key, m in matched[str(la)].items():
            dd, what = m["diff_cov_v_minus_v"], "KL" if key.startswith("owl") else "owl gain"
            say(
                f"  at {key}: {what} v {m['v']['value']:.4f} (c {m['v']['whitened_c']:.3g}) "
                f"cov_v {m['cov_v']['value']:.4f} (c {m['cov_v']['whitened_c']:.3g}); cov_v - v "
                f"{dd['value']:+.4f} [{dd['ci95'][0]:+.4f}, {dd['ci95'][1]:+.4f}] ({dd['kept']} kept)"
            )
    for key, u in uniform.items():
        say(
            f"SD over {u['n_layers_reaching']} layers of log2(strength for {key}): whitened "
            f"{u['whitened']['value']:.3f} {np.round(u['whitened']['ci95'], 3)}, whitened "
            f"(no shrinkage) {u['whitened_none']['value']:.3f} "
            f"{np.round(u['whitened_none']['ci95'], 3)} vs L2/rms "
            f"{u['l2_rel']['value']:.3f} {np.round(u['l2_rel']['ci95'], 3)}; whitened - L2 "
            f"{u['whitened-l2_rel']['value']:+.3f} {np.round(u['whitened-l2_rel']['ci95'], 3)}, "
            f"no-shrinkage - L2 {u['whitened_none-l2_rel']['value']:+.3f} "
            f"{np.round(u['whitened_none-l2_rel']['ci95'], 3)}"
        )
    for u, f in fixed.items():
        say(
            f"fixed {u} strength {f['nominal']:.3g}: owl gains "
            f"{np.round(f['owl_gain_per_layer'], 3)} range {f['owl_gain_range']['value']:.3f} "
            f"{np.round(f['owl_gain_range']['ci95'], 3)}; KL {np.round(f['kl_per_layer'], 3)} "
            f"SD log2 {f['log2_kl_sd']['value']:.3f} {np.round(f['log2_kl_sd']['ci95'], 3)}"
        )
    say(f"wrote {RESULTS / name}.json/.png; {clock.figures()}")


if __name__ == "__main__":
    main()
