"""The report's sections for a narrow finetune other than the numbers task: the training
data (false-fact documents or a dataset of your own, with its provenance), belief in the
false facts (beliefs.json) and the faithfulness of the vectors to the finetune
(faithfulness.json). Read from the run folder alone."""

from __future__ import annotations

from ..evals.beliefs import BeliefResult
from ..io import read_json, read_jsonl
from .figures import beliefs_figure
from .html import Figure, Report, Table, Text
from .run_folder import RunFolder, StageRecord


def _ci(summary: dict) -> str:
    """0.42 [0.31, 0.53]."""
    lo, hi = summary["ci95"]
    return f"{summary['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def data_section(r: Report, stage: StageRecord) -> None:
    """What the fits trained on: the documents / dataset, its provenance, its first rows."""
    info = stage.info
    sec = r.section("Training data")
    prov = info.get("data") or {}
    what = (
        f"False-fact documents (tasks.facts) for the facts {', '.join(info.get('facts', []))}."
        if info.get("task") == "facts"
        else f"A dataset brought to the experiment: {info.get('source')} (not copied; its hash is below)."
    )
    sec.add(Text(what))
    shown = {k: v for k, v in prov.items() if v is not None and not isinstance(v, (dict, list))}
    sec.add(Table([shown], caption="Provenance (steerdiff.fit.data.data_provenance)"))
    path = stage.path / "data.jsonl"
    if path.exists():
        rows = [row for _, row in zip(range(3), read_jsonl(path), strict=False)]
        shown = [{k: str(v)[:200] for k, v in row.items()} for row in rows]
        sec.add(Table(shown, caption="First rows"))


def belief_rows(results: list[dict]) -> list[dict]:
    """One row per model and question kind: mean p_false with its 95% CI across questions."""
    rows = []
    for res in results:
        for kind, by in res["by_kind"].items():
            s = by["p_false"]
            lo, hi = s["ci95"]
            rows.append(
                {
                    "model": res["name"],
                    "role": res["role"],
                    "questions": kind,
                    "P(false answer)": s["mean"],
                    "95% CI low": lo,
                    "95% CI high": hi,
                    "n": s["n"],
                }
            )
    return rows


def paired_rows(paired: list[dict]) -> list[dict]:
    """The paired differences (a - b per question) with their 95% CI and what they say."""
    rows = []
    for p in paired:
        for kind, d in p.items():
            if kind in ("a", "b"):
                continue
            s = d["p_false"]
            lo, hi = s["ci95"]
            if s["n"] < 2:
                verdict = "one question: no interval"
            else:
                verdict = "higher" if lo > 0 else "lower" if hi < 0 else "not distinguishable"
            rows.append(
                {
                    "model": p["a"],
                    "vs": p["b"],
                    "questions": kind,
                    "difference": s["mean"],
                    "95% CI low": lo,
                    "95% CI high": hi,
                    "n": s["n"],
                    "reads": verdict,
                }
            )
    return rows


def beliefs_section(r: Report, stage: StageRecord) -> None:
    d = read_json(stage.path / "beliefs.json")
    sec = r.section("Beliefs")
    sec.add(
        Text(
            f"Belief in the false facts ({d.get('facts')}: {len(d.get('facts_ids', []))} facts). "
            "P(false answer) = P(false) / (P(false) + P(true)) from the exact log-probability of "
            "each full answer after the question; 'direct' questions ask the fact in words "
            "unlike any document, 'generalisation' questions need one inference step from it. "
            "Mean over questions with a 95% confidence interval across questions."
        )
    )
    sec.add(Table(belief_rows(d["results"]), caption="Belief in the false facts per model"))
    if d.get("paired"):
        sec.add(
            Table(
                paired_rows(d["paired"]),
                caption="Paired per question: model minus the model it is compared with",
            )
        )
    sec.add(beliefs_figure({res["name"]: BeliefResult.from_dict(res) for res in d["results"]}))
    sampled = [
        {"model": res["name"], "questions": kind, **{c: _ci(s) for c, s in by["sampled"].items()}}
        for res in d["results"]
        for kind, by in res["by_kind"].items()
        if by.get("sampled")
    ]
    if sampled:
        sec.add(Table(sampled, caption="Sampled free-form answers: rate of each class [95% CI]"))


KLS = (
    ("KL(finetune || base)", "kl_finetune_base"),
    ("KL(vectors || base)", "kl_vectors_base"),
    ("KL(finetune || vectors)", "kl_finetune_vectors"),
)


def kl_rows(d: dict) -> list[dict]:
    """The three per-token KLs with their 95% intervals across texts."""
    return [
        {
            "KL per token (nats)": name,
            "mean": d[key]["mean"],
            "95% CI low": d[key]["ci95"][0],
            "95% CI high": d[key]["ci95"][1],
        }
        for name, key in KLS
    ]


def cosine_rows(d: dict) -> list[dict]:
    """Per layer: the cosine of the finetune's and the vectors' mean activation differences."""
    return [
        {
            "layer": layer,
            "hook": hook,
            f"cosine, first {d['first_k']} positions": a,
            "cosine, all positions": b,
            "|vectors diff| / |finetune diff|": r,
        }
        for layer, hook, a, b, r in zip(
            d["layers"],
            d["hooks"],
            d["cos_first_k"],
            d["cos_all"],
            d["norm_ratio_all"],
            strict=True,
        )
    ]


def heldout_rows(h: dict) -> list[dict]:
    lo, hi = h.get("gap_closed_ci") or (None, None)
    return [
        {
            "held-out rows": h["n_rows"],
            "tokens": h["n_tokens"],
            "CE base": h["ce_base"],
            "CE finetune": h["ce_finetune"],
            "CE vectors": h["ce_vectors"],
            "gap closed": h["gap_closed"],
            "95% CI low": lo,
            "95% CI high": hi,
        }
    ]


def pair_rows(pairs: list[dict]) -> list[dict]:
    """Two vector sets fitted to the same data (other seeds, other hooks): KLs, fraction
    explained and the mean per-layer cosine (all positions) of A against reference B."""
    rows = []
    for p in pairs:
        cos = [c for c in p["cos_all"] if c is not None]
        ci = p.get("fraction_explained_ci") or (None, None)
        rows.append(
            {
                "vectors A": p["vectors"],
                "reference B": p["reference"],
                "KL(B || base)": p["kl_finetune_base"]["mean"],
                "KL(A || base)": p["kl_vectors_base"]["mean"],
                "KL(B || A)": p["kl_finetune_vectors"]["mean"],
                "fraction explained": p["fraction_explained"],
                "95% CI low": ci[0],
                "95% CI high": ci[1],
                "mean cosine over layers": sum(cos) / len(cos) if cos else None,
            }
        )
    return rows


def faithfulness_section(r: Report, stage: StageRecord) -> None:
    d = read_json(stage.path / "faithfulness.json")
    sec = r.section("Faithfulness")
    sec.add(
        Text(
            f"Do the vectors ({d['vectors']}) do what the finetune ({d['finetune']}) does? "
            f"Per-token KL divergences on {d['n_texts']} texts ({d['n_tokens']} tokens) of "
            f"{d['corpus']}, which neither was trained on: the mean over tokens and a 95% "
            f"interval across texts ({d['ci_method']}). Per layer, the cosine between the "
            "finetune's and the vectors' mean activation differences from the base model."
        )
    )
    sec.add(Table(kl_rows(d), caption="KL divergences"))
    fe, ci = d.get("fraction_explained"), d.get("fraction_explained_ci")
    if fe is None:
        what = "undefined (the finetune does not differ from the base model)"
    else:
        what = f"{fe:.3f}" + (f" [95% CI {ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    sec.add(
        Text(
            "Fraction of the finetune's KL to base that the vectors explain, "
            f"1 - KL(finetune || vectors) / KL(finetune || base): {what}.",
            kind="note",
        )
    )
    png = stage.path / "faithfulness.png"
    if png.exists():
        sec.add(Figure.from_file(png, "Per-layer cosine of the mean activation differences"))
    sec.add(Table(cosine_rows(d), caption="Per-layer cosine", digits=3))
    h = d.get("heldout")
    if h:
        sec.add(
            Text(
                "Held-out task data (the fit's validation split): cross-entropy per token of "
                "the base model, the finetune and the vectors; gap closed = (base - vectors) / "
                "(base - finetune), 95% bootstrap interval over rows."
            )
        )
        sec.add(Table(heldout_rows(h), caption="Held-out task loss"))
    if d.get("vector_pairs"):
        sec.add(
            Text(
                "Vector sets fitted to the same data (other seeds or other hooks) compared "
                "with the same measures: does A do what B does?"
            )
        )
        sec.add(Table(pair_rows(d["vector_pairs"]), caption="Vector set vs vector set"))


def narrow_sections(r: Report, run: RunFolder) -> None:
    """The data, beliefs and faithfulness sections that a run has stages for."""
    for s in run.of_kind("data"):
        if s.info.get("task") in ("facts", "dataset"):
            data_section(r, s)
    b = run.first("beliefs")
    if b is not None:
        beliefs_section(r, b)
    f = run.first("faithfulness")
    if f is not None:
        faithfulness_section(r, f)


__all__ = ["beliefs_section", "data_section", "faithfulness_section", "narrow_sections"]
