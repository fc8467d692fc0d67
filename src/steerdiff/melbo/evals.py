"""What each MELBO vector does: sampled completions and the project's evals, ranked, and
whether a planted direction is among the vectors.

Each vector steers at its source hook with coefficient 1 (it already has norm R), every
position. The evals (`EVALS`):
- "preference": the exact trait share (evals.preference.exact_preference), and its shift
  from the unsteered model, paired over questions (95% CI);
- "misalignment": p_misaligned on the multiple-choice bank
  (evals.misalignment.evaluate_misalignment_mc), shift paired over questions (95% CI);
- "coherence": KL(unsteered || steered) on neutral prompts (evals.scoring.CoherenceProbe).
Vectors are ranked by the shift of the first of preference / misalignment evaluated, so
the top of the list are the vectors that most elicit that behaviour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..chat import chat_texts, read_lines_resource
from ..evals.misalignment import ALL, evaluate_misalignment_mc, paired_misalignment
from ..evals.preference import exact_preference, paired_difference, sample_answers
from ..evals.scoring import CoherenceProbe
from ..evals.steering import Steering
from ..intervals import mean_ci95
from ..models import LoadedModel
from ..progress import progress as progress_bar
from .config import MelboConfig, parse_evals
from .store import MelboResult


def _preference(lm: LoadedModel, cfg: MelboConfig, steering: Steering | None):
    return exact_preference(
        lm, cfg.target, cfg.category, n_questions=cfg.n_questions, steering=steering
    )


def _samples(lm: LoadedModel, cfg: MelboConfig, steering: Steering | None) -> list[dict]:
    """One sampled completion (temperature 1, seeded) for each of the first n_samples prompts."""
    if cfg.n_samples == 0:
        return []
    qs = read_lines_resource("neutral_prompts.txt")[: cfg.n_samples]
    texts = chat_texts(lm.tokenizer, qs, None)
    out = sample_answers(
        lm, texts, 1, max_new_tokens=cfg.sample_tokens, seed=cfg.seed, steering=steering
    )
    return [{"prompt": q, "completion": a[0]} for q, a in zip(qs, out, strict=True)]


def evaluate_vectors(
    lm: LoadedModel,
    res: MelboResult,
    cfg: MelboConfig,
    evals: Sequence[str] | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """{"base": the unsteered model's evals and samples, "vectors": one entry per vector
    (evals, shifts with 95% CIs, samples), "ranking": vector indices, most shifted first,
    "rank_by": the eval ranked on}. evals: default cfg.evals."""
    names = parse_evals(cfg.evals if evals is None else evals)
    base: dict[str, Any] = {"samples": _samples(lm, cfg, None)}
    pref0 = mis0 = probe = None
    if "preference" in names:
        pref0 = _preference(lm, cfg, None)
        base["preference"] = {"target_rate": pref0.target_rate, "ci95": list(pref0.ci95)}
    if "misalignment" in names:
        mis0 = evaluate_misalignment_mc(lm)
        base["misalignment"] = mis0.summarise()["p_misaligned"]
    if "coherence" in names:
        probe = CoherenceProbe(lm, read_lines_resource("neutral_prompts.txt"))
    rows = []
    with progress_bar(len(res), "melbo evals", disable=not progress) as bar:
        for i in range(len(res)):
            st = Steering(res.vector_set(i))
            row: dict[str, Any] = {"vector": i, "objective": res.curves[i][-1]}
            if pref0 is not None:
                r = _preference(lm, cfg, st)
                shift, ci = paired_difference(r, pref0)
                row["preference"] = {
                    "target_rate": r.target_rate,
                    "ci95": list(r.ci95),
                    "shift": shift,
                    "shift_ci95": list(ci),
                    "top": max(r.distribution, key=r.distribution.get),
                }
            if mis0 is not None:
                m = evaluate_misalignment_mc(lm, steering=st)
                d = paired_misalignment(m, mis0)[ALL]["p_misaligned"]
                row["misalignment"] = {
                    **m.summarise()["p_misaligned"],
                    "shift": d["mean"],
                    "shift_ci95": d["ci95"],
                }
            if probe is not None:
                kl, ci = mean_ci95(probe.kl_per_prompt(st)[0].tolist())  # CI over prompts
                row["coherence_kl"], row["coherence_kl_ci95"] = kl, list(ci)
            row["samples"] = _samples(lm, cfg, st)
            rows.append(row)
            bar.update(1)
    rank_by = next((n for n in ("preference", "misalignment") if n in names), None)
    key = (lambda r: -r[rank_by]["shift"]) if rank_by else (lambda r: -r["objective"])
    ranking = [r["vector"] for r in sorted(rows, key=key)]
    return {
        "evals": names,
        "base": base,
        "vectors": rows,
        "rank_by": rank_by or "objective",
        "ranking": ranking,
    }


def planted_recovery(
    vectors: torch.Tensor, planted: torch.Tensor, n_random: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Is a planted direction among the learned vectors [N, d]? |cos(theta_i, planted)| per
    vector, the best, and the fraction of the planted direction inside their span; with the
    chance levels of N random Gaussian directions (n_random draws: the mean and 95th
    percentile of the best |cos| and of the span fraction; 1/sqrt(d) for one vector).
    above_chance: the best |cos| beats that 95th percentile (which says the vectors are not
    random with respect to the planted direction, not that one of them is it)."""
    V = vectors.double()
    pl = planted.double().flatten()
    pl = pl / pl.norm()
    cos = (V @ pl / V.norm(dim=1)).abs()
    span = float(torch.linalg.qr(V.T).Q.T.matmul(pl).norm()) if len(V) else 0.0
    N, d = V.shape
    gen = torch.Generator().manual_seed(seed)
    best_r, span_r = [], []
    for _ in range(n_random):
        R = torch.randn(N, d, generator=gen, dtype=torch.float64)
        best_r.append(float((R @ pl / R.norm(dim=1)).abs().max()))
        span_r.append(float(torch.linalg.qr(R.T).Q.T.matmul(pl).norm()))
    best_r_t, span_r_t = torch.tensor(best_r), torch.tensor(span_r)
    best = int(cos.argmax()) if N else None
    return {
        "cos": cos.tolist(),
        "best_vector": best,
        "best_cos": float(cos.max()) if N else 0.0,
        "span_fraction": span,
        "chance_one_vector": 1.0 / math.sqrt(d),
        "chance_best_cos_mean": float(best_r_t.mean()),
        "chance_best_cos_p95": float(best_r_t.quantile(0.95)),
        "chance_span_mean": float(span_r_t.mean()),
        "chance_span_p95": float(span_r_t.quantile(0.95)),
        # a test against chance, not recovery: a best |cos| of 0.12 can be above chance
        "above_chance": bool(N) and float(cos.max()) > float(best_r_t.quantile(0.95)),
        "n_random": n_random,
    }
