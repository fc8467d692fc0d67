"""The report's profile section: the layer profiles (adding and subtracting the trait
vector, effect vs relative depth, a line per model) and the perception-vs-behaviour probe,
from the run's profile stage (pipeline.profile_stage: profile.json, profile.png,
perception.png)."""

from __future__ import annotations

from ..io import read_json
from .html import Figure, Report, Table, Text
from .run_folder import RunFolder


def peak_rows(data: dict) -> list[dict]:
    """One row per model and direction: the peak layer, its relative depth, effect, CI."""
    rows = []
    for p in data["peaks"]:
        for d in ("add", "subtract"):
            pk = p.get(d) or {}
            if not pk:
                continue
            lg = pk["log"]
            rows.append(
                {
                    "model": p["model"],
                    "family": p["family"],
                    "direction": d,
                    "peak layer": f"{pk['layer']} of {p['n_layers']}",
                    "relative depth": round(pk["depth"], 3),
                    "strength": pk["strength"],
                    "effect (share)": f"{pk['effect']:+.3f} "
                    f"[{pk['ci95'][0]:+.3f}, {pk['ci95'][1]:+.3f}]",
                    "within KL bound": pk["within_kl"],
                    "peak by log share": f"layer {lg['layer']} ({lg['depth']:.2f}): "
                    f"{lg['log_effect']:+.2f} [{lg['log_ci95'][0]:+.2f}, {lg['log_ci95'][1]:+.2f}]",
                }
            )
    return rows


def dominance_rows(data: dict) -> list[dict]:
    """Per model: the layers where perception / behaviour dominates."""
    rows = []
    for m in data["models"]:
        p = m.get("perception")
        if not p:
            continue
        by = {
            k: [la for la, d in zip(p["layers"], p["dominant"], strict=True) if d == k]
            for k in ("perception", "behaviour", "neither")
        }
        rows.append({"model": m["model"], **{k: str(v) for k, v in by.items()}})
    return rows


def profile_sections(r: Report, run: RunFolder) -> None:
    """The layer-profile section of the run's profile stage, if it has one."""
    st = run.first("profile")
    if st is None or not (st.path / "profile.json").exists():
        return
    data = read_json(st.path / "profile.json")
    cfg = data["config"]
    sec = r.section("Layer profiles", anchor="profile")
    sec.add(
        Text(
            f"The {cfg['target']!r} trait vector ({cfg['readout']} readout) added and "
            f"subtracted at each layer's residual stream; per layer the strength of "
            f"{cfg['strengths']} that moves the {cfg['target']} share most with KL <= "
            f"{cfg['kl_bound']}, re-scored on {cfg['ci_questions']} further questions "
            "(95% CI over questions). x = layer / (n_layers - 1)."
        )
    )
    sec.add(Figure.from_file(st.path / "profile.png", "effect vs relative depth"))
    sec.add(Table(peak_rows(data), caption="peak layer per model and direction"))
    if (st.path / "perception.png").exists():
        sec.add(
            Figure.from_file(
                st.path / "perception.png",
                "perception (only the review steered; its classification read) vs behaviour "
                "(only the reply steered; its next word read), log-odds shift, 95% CI",
            )
        )
        sec.add(Table(dominance_rows(data), caption="layers where each dominates"))
