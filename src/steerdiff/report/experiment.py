"""Build the report page of one experiment run from its stage folders."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..io import read_json, read_jsonl
from .html import Code, Figure, Report, Table, Text, write

if TYPE_CHECKING:
    from ..pipeline import RunState


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _eval_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        lo, hi = r["ci95"]
        dist = {k: v for k, v in r.get("distribution", {}).items() if k != r["target"]}
        top_other = max(dist.items(), key=lambda kv: kv[1]) if dist else ("", 0.0)
        rows.append(
            {
                "model": r["name"],
                "role": r["role"],
                f"{r['target']} rate": r["target_rate"],
                "95% CI low": lo,
                "95% CI high": hi,
                "top other": f"{top_other[0]} ({_pct(top_other[1])})",
                "questions": r.get("n_questions"),
            }
        )
    return rows


def _eval_figure(results: list[dict]) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(results)))
    names = [r["name"] for r in results][::-1]
    rates = [r["target_rate"] for r in results][::-1]
    los = [r["target_rate"] - r["ci95"][0] for r in results][::-1]
    his = [r["ci95"][1] - r["target_rate"] for r in results][::-1]
    colors = {"base": "#888", "teacher": "#d98c1f", "student": "#3b7dd8", "baseline": "#6a4"}
    ax.barh(
        names,
        rates,
        xerr=[los, his],
        color=[colors.get(r["role"], "#3b7dd8") for r in results][::-1],
        capsize=3,
    )
    ax.set_xlabel(f"{results[0]['target']} share (mean over questions, 95% CI)")
    ax.set_xlim(0, max(0.05, max(r["ci95"][1] for r in results) * 1.15))
    return Figure.from_matplotlib(
        fig, "Trait evaluation: target share per model with 95% CI across questions"
    )


def _verdict(results: list[dict]) -> Text:
    """Say plainly whether students moved toward the trait, with intervals."""
    base = next((r for r in results if r["role"] == "base"), None)
    lines = []
    if base is None:
        return Text("No base model result.")
    b_lo, b_hi = base["ci95"]
    for r in results:
        if r["role"] in ("base",):
            continue
        lo, hi = r["ci95"]
        ratio = r["target_rate"] / base["target_rate"] if base["target_rate"] > 0 else float("inf")
        if lo > b_hi:
            what = "higher than the base model (intervals do not overlap)"
        elif hi < b_lo:
            what = "lower than the base model (intervals do not overlap)"
        else:
            what = "not distinguishable from the base model (intervals overlap)"
        lines.append(
            f"{r['name']} ({r['role']}): {_pct(r['target_rate'])} [{_pct(lo)}, {_pct(hi)}] vs base "
            f"{_pct(base['target_rate'])} [{_pct(b_lo)}, {_pct(b_hi)}], x{ratio:.2f}: {what}."
        )
    return Text("\n\n".join(lines), kind="note")


def _loss_figure(fits: list[tuple[str, Path]]) -> Figure | None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    drawn = False
    for name, folder in fits:
        path = folder / "metrics.jsonl"
        if not path.exists():
            continue
        rows = list(read_jsonl(path))
        tr = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
        va = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if tr:
            (line,) = ax.plot(*zip(*tr, strict=True), alpha=0.5, label=f"{name} train")
            if va:
                ax.plot(*zip(*va, strict=True), "o-", color=line.get_color(), label=f"{name} val")
            drawn = True
        base = next(
            (r.get("base_val_loss") for r in rows if r.get("base_val_loss") is not None), None
        )
        teach = next(
            (r.get("teacher_val_loss") for r in rows if r.get("teacher_val_loss") is not None), None
        )
        if base is not None:
            ax.axhline(base, color="#888", ls="--", lw=0.8)
        if teach is not None:
            ax.axhline(teach, color="#d98c1f", ls="--", lw=0.8)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on completion tokens")
    ax.legend(fontsize=7)
    return Figure.from_matplotlib(
        fig, "Loss curves (dashed: base model grey, teacher orange, on the validation split)"
    )


def _dla_table(d: dict, n: int = 12) -> list[dict]:
    top = d.get("top", [])[:n]
    bottom = d.get("bottom", [])[:n]
    rows = []
    for i in range(max(len(top), len(bottom))):
        row: dict[str, Any] = {"rank": i + 1}
        if i < len(top):
            row["promoted"] = repr(top[i]["token"])
            row["score +"] = top[i]["score"]
        if i < len(bottom):
            row["suppressed"] = repr(bottom[i]["token"])
            row["score -"] = bottom[i]["score"]
        rows.append(row)
    return rows


def build_report(state: RunState, path: Path) -> Path:
    cfg = state.cfg
    st = state.stages
    r = Report(
        f"steerdiff: {cfg.name}",
        subtitle=f"model {cfg.model}; teacher {cfg.teacher.kind} ({cfg.teacher.animal})",
    )

    ev = next((s for n, s in st.items() if n == "eval"), None)
    results = read_json(ev.path / "eval.json")["results"] if ev else []
    sec = r.section("Trait evaluation")
    if results:
        sec.add(
            Text(
                f"Scorer: {cfg.eval.scorer} ({'probability of each candidate answer, normalised over the candidate list' if cfg.eval.scorer == 'exact' else 'sampled one-word answers at temperature 1'}), "
                f"{cfg.eval.n_questions} questions, no system prompt except for prompted teachers. "
                "The interval is a 95% confidence interval across questions."
            )
        )
        sec.add(_verdict(results))
        sec.add(Table(_eval_rows(results), caption="Target share per model"))
        sec.add(_eval_figure(results))

    sec = r.section("Teacher data")
    for name, s in st.items():
        if name.startswith("data-"):
            info = s.info
            rows = [
                {
                    "dataset": name,
                    "prompts": info.get("n_prompts"),
                    "valid rows": info.get("n_valid"),
                    "tokens/s": info.get("tokens_per_second"),
                    "unconstrained valid rate": info.get("unconstrained_valid_rate"),
                }
            ]
            sec.add(Table(rows))
            if info.get("rejects"):
                sec.add(
                    Table(
                        [{"reason": k, "count": v} for k, v in info["rejects"].items()],
                        caption=f"{name}: rejected rows by reason",
                    )
                )
            examples = [
                row for _, row in zip(range(3), read_jsonl(s.path / "data.jsonl"), strict=False)
            ]
            sec.add(
                Table(
                    [
                        {
                            "user": e["messages"][0]["content"][:120],
                            "assistant": e["messages"][-1]["content"][:80],
                        }
                        for e in examples
                    ],
                    caption="First rows (what the student sees)",
                )
            )

    fits = [
        (n.removeprefix("fit-"), s.path)
        for n, s in st.items()
        if n.startswith(("fit-", "baseline-"))
    ]
    sec = r.section("Fits")
    if fits:
        rows = []
        for n, s in st.items():
            if n.startswith(("fit-", "baseline-")):
                i = s.info
                rows.append(
                    {
                        "fit": n,
                        "base val loss": i.get("base_val_loss"),
                        "teacher val loss": i.get("teacher_val_loss"),
                        "fitted val loss": i.get("fitted_val_loss"),
                        "loss gap closed": _with_ci(i.get("gap_closed"), i.get("gap_closed_ci")),
                        "KL gap closed": _with_ci(
                            i.get("kl_gap_closed"), i.get("kl_gap_closed_ci")
                        ),
                        "steps": i.get("steps"),
                    }
                )
        sec.add(
            Text(
                "Loss gap closed = (base - fitted) / (base - teacher) in cross-entropy on the "
                "validation completions; KL gap closed = 1 - KL(teacher || fitted) / "
                "KL(teacher || base) over the teacher's stored top-k (distillation fits). "
                "Brackets: 95% bootstrap interval over validation rows."
            )
        )
        small = [
            x["fit"]
            for x in rows
            if x["base val loss"] is not None
            and x["teacher val loss"] is not None
            and abs(x["base val loss"] - x["teacher val loss"]) < 0.05
        ]
        if small:
            sec.add(
                Text(
                    f"For {', '.join(small)} the base and teacher validation losses differ by "
                    "less than 0.05 nats per token, so the cross-entropy gap closed is dominated "
                    "by noise (values far outside 0..1 happen); read the KL gap closed instead.",
                    kind="warn",
                )
            )
        sec.add(Table(rows))
        fig = _loss_figure(fits)
        if fig:
            sec.add(fig)
    else:
        sec.add(Text("No fits in this experiment."))

    rd = st.get("read")
    if rd is not None:
        read = read_json(rd.path / "read.json")
        if read.get("planted"):
            sec = r.section("Planted-vector check")
            sec.add(
                Text(
                    "The steered teacher is the model plus a known vector v* at one hook; a vector fitted at that hook on the teacher's data should point the same way (cosine near 1). The DLA overlap counts shared tokens among the top 20 of the fitted vector and of v*."
                )
            )
            sec.add(Table(read["planted"]))
        sec = r.section("Direct logit attribution")
        sec.add(
            Text(
                "Residual-stream vectors pushed through the final norm's scale and the unembedding. 'centred' subtracts the mean over the vocabulary from each unembedding column, removing a shift of every logit that otherwise dominates the top tokens."
            )
        )
        for key, d in read.get("dla", {}).items():
            if key.endswith("|centred"):
                sec.add(Table(_dla_table(d), caption=key.replace("|", "  ·  "), digits=3))
        if not read.get("dla"):
            sec.add(
                Text(
                    "No residual-stream vectors to read directly (q/k/v and norm-input biases are read through the lens below)."
                )
            )
        lens = read.get("lens")
        sec = r.section("Activation-difference lens")
        if lens:
            hit = lens.get("first_hit")
            sec.add(
                Text(
                    f"Mean activation difference (model with the '{lens['fit']}' vectors minus without) over {lens['n_texts']} corpus texts x {lens['seq_len']} tokens, "
                    f"per position for the first positions and over all positions, read through the centred logit lens at {', '.join(lens['hooks'])}. "
                    + (
                        f"First trait token in a top-20: {hit['token']!r} at {hit['hook']} position {hit['position']} (rank {hit['rank']})."
                        if hit
                        else "No trait token reached the top 20 at any hook or position."
                    ),
                    kind="note",
                )
            )
            png = rd.path / "lens" / "lens_positions.png"
            if png.exists():
                sec.add(
                    Figure.from_file(png, "Top tokens of the mean difference per hook and position")
                )
            rows = [
                {
                    "hook": x["hook"],
                    "position": x["position"],
                    "|diff|": x["diff_norm"],
                    "top tokens": " ".join(repr(t["token"]) for t in x["top"][:8]),
                }
                for x in lens["readout"]["rows"] + lens["readout"]["logits"]
            ]
            sec.add(Table(rows, caption="Lens readout", digits=3))
        else:
            sec.add(Text("Lens not run (read.lens_texts = 0 or no fitted vectors)."))
        sec = r.section("Similarity")
        if read.get("similarity"):
            sec.add(
                Table(
                    [
                        {"pair": k, "mean cosine over shared hooks": v}
                        for k, v in read["similarity"].items()
                    ]
                )
            )
        else:
            sec.add(Text("No pairs of vector sets with shared hooks."))

    sec = r.section("Provenance")
    for name, s in st.items():
        meta = read_json(s.path / "stage.json")
        sec.add(
            Code(
                {
                    "stage": name,
                    "folder": s.path.name,
                    "seconds": meta.get("seconds"),
                    "provenance": meta.get("provenance"),
                    "depends_on": meta.get("depends_on"),
                },
                caption=name,
            )
        )
    sec.add(Code(cfg.model_dump(), caption="experiment config"))
    return write(r, path)


def _with_ci(value: float | None, ci: list[float] | tuple[float, float] | None) -> str | None:
    """0.62 [0.55, 0.70] (a bootstrap interval over validation rows), or the bare value."""
    if value is None:
        return None
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.2f}"
