"""The report's SAE section: a vector or a finetune read in a sparse autoencoder's latents.

`sae_blocks(data)` turns the dict that `steerdiff sae read` writes (sae_read.json) into the
blocks of one section (`sae_section(data)`: their HTML):

  - the decomposition: the top latents by cosine of their decoder direction with the
    vector (or with the mean activation difference at the SAE's hook), with the pullbacks
    W_dec v and W_enc^T v;
  - the latent effects on corpus text: the latents raised and lowered most, over all
    positions and over the first k, and a bar chart of them;
  - a dashboard per latent: its top-activating snippets (the max token outlined, every
    token shaded by the latent's value there), how often it fires, and the tokens its
    decoder direction promotes and suppresses (centred DLA).

data keys (each optional but "sae"): "sae" {path, format, hook, d_in, d_sae, activation},
"change" {mode, what}, "decomposition" {of, hook, norm, top: [{latent, cosine,
pullback_dec, pullback_enc}]}, "effects" (LatentEffects.to_dict()), "dashboards"
([LatentDashboard.to_dict()]), "top" (rows per table, default 10).
`sae_report(data)` is the standalone page (`steerdiff sae read` writes it as sae_read.html).
"""

from __future__ import annotations

import html

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..interpret.sae_effects import LatentEffects
from ..io import read_json
from .html import Block, Code, Figure, Html, Report, Section, Table, Text, render_blocks
from .run_folder import RunFolder


def sae_section(data: dict) -> str:
    """HTML of the SAE section's content (e.g. to show in a notebook)."""
    return render_blocks(sae_blocks(data))


def sae_blocks(data: dict) -> list[Block]:
    """The SAE section's content as report blocks."""
    k = int(data.get("top", 10))
    effects = LatentEffects.from_dict(data["effects"]) if data.get("effects") else None
    blocks: list[Block] = [Text(_intro(data, effects))]
    dec = data.get("decomposition")
    if dec:
        blocks += _decomposition_blocks(dec, effects, k)
    if effects is not None:
        blocks += _effect_blocks(effects, k)
    if data.get("dashboards"):
        blocks.append(Html("<h3>Latent dashboards</h3>"))
        for d in data["dashboards"]:
            change = None if effects is None else float(effects.all_mean[int(d["latent"])])
            blocks.append(Html(dashboard_html(d, change)))
    return blocks


def sae_report(data: dict, title: str = "SAE reading") -> Report:
    """A one-section page of `sae_blocks(data)` (write it with report.html.write)."""
    sae = data.get("sae", {})
    return Report(
        title=title,
        subtitle=f"{sae.get('path', '')} at {sae.get('hook', '')}",
        sections=[Section("Sparse autoencoder", sae_blocks(data), anchor="sae")],
    )


def _intro(data: dict, effects: LatentEffects | None) -> str:
    sae = data.get("sae", {})
    what = data.get("change", {}).get("what", "The change")
    text = (
        f"{what} read in the latents of the SAE {sae.get('path', '?')} "
        f"({sae.get('format', '?')}, {sae.get('activation', '?')}, {sae.get('d_sae', '?')} latents "
        f"of width {sae.get('d_in', '?')}) at {sae.get('hook', '?')}."
    )
    if effects is not None:
        skip = effects.meta.get("skip_first", 1)
        text += (
            f" Latent effects: the mean change (changed - base) of each latent's activation over "
            f"{effects.n_texts} texts of {effects.meta.get('corpus', 'the corpus')} "
            f"({effects.n_tokens} tokens; the first {skip} position(s) of each text left out "
            f"of the all-position mean), and at each of the first {effects.first_k} positions."
        )
    return text


def _decomposition_blocks(dec: dict, effects: LatentEffects | None, k: int) -> list[Block]:
    of = dec.get("of", "vector")
    rows = []
    for i, r in enumerate(dec.get("top", [])[:k]):
        row = {
            "rank": i + 1,
            "latent": r["latent"],
            "cosine": r["cosine"],
            "W_dec v": r["pullback_dec"],
            "W_enc^T v": r["pullback_enc"],
        }
        if effects is not None:
            row["rank by effect (all)"] = effects.rank(int(r["latent"]))
        rows.append(row)
    note = (
        f"Decomposition of the {of} at {dec.get('hook', '?')} (norm {dec.get('norm', float('nan')):.3g}): "
        "latents ranked by the cosine of their decoder direction with it; W_dec v is its "
        "component along each decoder row, W_enc^T v how much it moves each latent's "
        "pre-activation."
    )
    if of != "vector":
        note += (
            " The change has no vector at the SAE's hook (e.g. q/k/v biases or a finetune), "
            "so its mean activation difference there (all positions) is decomposed instead."
        )
    return [Html("<h3>Decomposition</h3>"), Text(note), Table(rows, "Top latents by cosine", 3)]


def effect_rows(effects: LatentEffects, k: int, where: str) -> list[dict]:
    """Side-by-side rows: the k latents raised most and the k lowered most."""
    up, down = effects.top(k, where, "up"), effects.top(k, where, "down")
    return [
        {
            "#": i + 1,
            "up: latent": u["latent"],
            "up: change": u["change"],
            "up: base mean": u["base"],
            "down: latent": d["latent"],
            "down: change": d["change"],
            "down: base mean": d["base"],
        }
        for i, (u, d) in enumerate(zip(up, down, strict=True))
    ]


def _effect_blocks(effects: LatentEffects, k: int) -> list[Block]:
    return [
        Html("<h3>Latent effects on corpus text</h3>"),
        Table(effect_rows(effects, k, "all"), "All positions: latents raised / lowered most", 3),
        Table(
            effect_rows(effects, k, "first_k"),
            f"First {effects.first_k} positions (mean of the per-position means)",
            3,
        ),
        effects_figure(effects, min(k, 10)),
    ]


def effects_figure(effects: LatentEffects, k: int = 10) -> Figure:
    """Horizontal bars: the k latents raised most (orange) and lowered most (blue)."""
    up, down = effects.top(k, "all", "up"), effects.top(k, "all", "down")
    rows = up + down[::-1]
    fig, ax = plt.subplots(figsize=(6.5, 0.6 + 0.28 * len(rows)))
    ax.barh(
        [f"latent {r['latent']}" for r in rows][::-1],
        [r["change"] for r in rows][::-1],
        color=["#d98c1f" if r["change"] >= 0 else "#3b7dd8" for r in rows][::-1],
    )
    ax.axvline(0, color="#888", lw=0.8)
    ax.set_xlabel("mean change of the latent's activation (changed - base), all positions")
    return Figure.from_matplotlib(
        fig, f"The {k} latents raised and lowered most at {effects.hook} (all positions)"
    )


def _token(tok: str) -> str:
    """A token as shown in a snippet: escaped, with newlines and tabs made visible."""
    return html.escape(tok).replace("\n", "⏎").replace("\t", "⇥")


def snippet_html(snippet: dict) -> str:
    """One snippet: tokens shaded by the latent's value (orange, darker = higher), the
    max-activating token outlined; each token's value in its tooltip."""
    values = snippet.get("values") or [0.0] * len(snippet["tokens"])
    top = max(max(values), snippet["value"], 1e-12)
    spans = []
    for i, (tok, v) in enumerate(zip(snippet["tokens"], values, strict=True)):
        alpha = max(0.0, min(1.0, v / top))
        style = f"background:rgba(230,120,0,{alpha:.2f})"
        if i == snippet["pos"]:
            style += ";outline:2px solid #a33;font-weight:bold"
        cls = ' class="max"' if i == snippet["pos"] else ""
        spans.append(f'<span{cls} style="{style}" title="{v:.3g}">{_token(tok)}</span>')
    return (
        f'<div style="font-family:monospace;white-space:pre-wrap;margin:.2em 0">'
        f'<span style="color:#888">{snippet["value"]:.3g} </span>{"".join(spans)}</div>'
    )


def _dla_list(items: list[dict]) -> str:
    return " ".join(
        f'<code title="{t["score"]:.3g}">{_token(repr(t["token"]))}</code>' for t in items
    )


def dashboard_html(d: dict, change: float | None = None) -> str:
    """One latent's dashboard: statistics, DLA tokens, top snippets."""
    stats = f"active on {100 * d['frac_active']:.2f}% of tokens, mean {d['mean_active']:.3g} when active"
    if change is not None:
        stats += f"; mean change {change:+.3g}"
    parts = [f"<h4>Latent {int(d['latent'])}</h4><p>{html.escape(stats)}</p>"]
    if d.get("dla_top"):
        parts.append(
            f"<p>DLA promotes: {_dla_list(d['dla_top'])}<br>DLA suppresses: {_dla_list(d['dla_bottom'])}</p>"
        )
    elif d.get("dla_note"):
        parts.append(f"<p><em>{html.escape(d['dla_note'])}</em></p>")
    parts += [snippet_html(s) for s in d.get("snippets", [])]
    return f'<div class="sae-latent">{"".join(parts)}</div>'


def sae_sections(r: Report, run: RunFolder) -> None:
    """One section per subject of the run's `sae` stage (pipeline.sae_stages: sae.json),
    and the trained SAEs' quality figures when the run trained them."""
    tr = run.first("sae_train")
    if tr is not None and (tr.path / "metrics.json").exists():
        metrics = read_json(tr.path / "metrics.json")
        r.section("SAE training", anchor="sae-train").add(Code(metrics, caption="metrics.json"))
    st = run.first("sae")
    if st is None:
        return
    data = read_json(st.path / "sae.json")
    for res in data["results"]:
        sec = r.section(f"SAE reading: {res['name']}", anchor=f"sae-{res['name']}")
        if "skipped" in res:
            sec.add(Text(f"Not read: {res['skipped']}"))
        else:
            sec.blocks += sae_blocks(res)
