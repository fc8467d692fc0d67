"""`steerdiff sweep --profile`: layer profiles of the trait vector across model families
(steerdiff.layer_profile); called from cli/sweep.py with the command's click context."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console, fail

# sweep option -> ProfileConfig field; only options given on the command line apply (the
# sweep's own defaults, e.g. strengths 1,2,4,8 or kl-bound 0.5, are not a profile's)
OPTIONS = {
    "target": "target",
    "category": "category",
    "layers": "layers",
    "strengths": "strengths",
    "readouts": "readout",
    "questions": "n_questions",
    "kl_bound": "kl_bound",
    "seed": "seed",
}


def given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option `name` on the command line (not its default)."""
    src = ctx.get_parameter_source(name)
    return src is not None and src.name == "COMMANDLINE"


def profile_options(ctx: typer.Context, strengths: list[float]) -> dict:
    """ProfileConfig fields from the options the user gave (strengths: --strengths parsed)."""
    out = {}
    for opt, field in OPTIONS.items():
        if not given(ctx, opt):
            continue
        value = ctx.params[opt]
        if opt == "strengths":
            value = strengths
        if opt == "readouts" and "," in value:
            fail(f"--profile takes one readout, e.g. --readouts last (got {value!r}).")
        out[field] = value
    return out


def run_profile(ctx: typer.Context, strengths: list[float]) -> None:
    """Load each model of --models, profile them, write profile.json/.png (perception.png)."""
    from steerdiff.layer_profile import ProfileConfig, layer_profile
    from steerdiff.models import load_model

    p = ctx.params
    names = [m.strip() for m in p["models"].split(",") if m.strip()]
    if not names:
        fail("--models is empty; give e.g. --models default,gemma3-270m.")
    if given(ctx, "units") and p["units"] != "l2":
        fail("--profile sweeps in L2 units only; drop --units (or run a plain sweep with it).")
    out = p["out"] if given(ctx, "out") else "runs/profile"
    cfg = ProfileConfig(**profile_options(ctx, strengths), perception=p["perception"])
    cfg.check()
    lms = [load_model(n, dtype=p["dtype"], device=p["device"]) for n in names]
    res = layer_profile(lms, cfg, resume_dir=Path(out) / "models")
    paths = res.write(out)
    for pk in res.to_dict()["peaks"]:
        for d in ("add", "subtract"):
            x = pk.get(d)
            if x:
                console.print(
                    f"{pk['model']} ({pk['family']}, {pk['n_layers']} layers) {d}: peak layer "
                    f"{x['layer']} (relative depth {x['depth']:.2f}) effect "
                    f"{x['effect']:+.3f} [{x['ci95'][0]:+.3f}, {x['ci95'][1]:+.3f}]"
                )
    console.print(f"wrote {', '.join(str(q) for q in paths.values())}")
