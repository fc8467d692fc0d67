"""`steerdiff sweep`: layer x strength x readout sweep of a trait steering vector."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import DeviceOpt, DtypeOpt, ModelOpt, OldModelArg, console, fail, pick_model
from .whiten import UnitsOpt, check_units

app = typer.Typer()


def parse_floats(text: str, what: str) -> list[float]:
    """'1,2,4,8' -> [1.0, 2.0, 4.0, 8.0]."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"--{what} must be comma-separated numbers, e.g. 1,2,4,8 (got {text!r}).")


def parse_layers(text: str) -> list[int] | None:
    """'' -> all layers (None); '0-29', '6,12,18', '20-' style ranges."""
    if not text.strip():
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                out += list(range(int(lo or 0), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError:
        fail(f"--layers must look like '0-29' or '6,12,18,24' (got {text!r}).")
    return out


@app.command()
def sweep(
    old_model: OldModelArg = None,
    model: ModelOpt = "default",
    target: Annotated[str, typer.Option(help="target candidate, e.g. owl")] = "owl",
    category: Annotated[
        str, typer.Option(help="'animals' or a YAML/JSON category file")
    ] = "animals",
    layers: Annotated[str, typer.Option(help="'' = all, '0-29', '6,12,18,24'")] = "",
    strengths: Annotated[str, typer.Option(help="comma list of coefficients")] = "1,2,4,8",
    readouts: Annotated[
        str, typer.Option(help="comma list of last,prompt_mean,response_mean,pca")
    ] = "last,prompt_mean,response_mean",
    questions: Annotated[
        int, typer.Option(help="exact-scorer questions per cell (first n of 50)")
    ] = 5,
    confirm_questions: Annotated[
        int, typer.Option(help="re-score the best cell on this many questions (0: skip)")
    ] = 50,
    off_target_bound: Annotated[float, typer.Option(help="max rise of any other candidate")] = 0.10,
    kl_bound: Annotated[
        float, typer.Option(help="max KL (nats/token) from the unsteered model")
    ] = 0.5,
    out: Annotated[str, typer.Option(help="output folder")] = "runs/sweep",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    seed: Annotated[int, typer.Option(help="seed (response sampling)")] = 0,
    units: UnitsOpt = "l2",
    profile: Annotated[
        bool, typer.Option("--profile", help="layer profiles across --models (add and subtract)")
    ] = False,
    models: Annotated[
        str, typer.Option(help="--profile: comma list of models")
    ] = "default,gemma3-270m",
    perception: Annotated[
        bool, typer.Option("--perception", help="--profile: perception-vs-behaviour probe too")
    ] = False,
    ctx: typer.Context = None,  # type: ignore[assignment]  # typer fills it in
) -> None:
    """Sweep layers x strengths x readouts of the trait system-prompt vector; write CSV, JSON, PNGs.

    With --profile: the add/subtract profile of the vector vs relative depth on each of
    --models (--layers 'all', 'every:k' or '0,6,12'; default strengths -8,-4,-2,2,4,8)."""
    if profile:
        from .profile import run_profile

        return run_profile(ctx, parse_floats(strengths, "strengths"))
    from rich.table import Table

    from steerdiff.extract import READOUTS
    from steerdiff.models import load_model
    from steerdiff.sweep import SweepConfig, run_sweep

    model = pick_model(model, old_model, "sweep")
    rlist = [r.strip() for r in readouts.split(",") if r.strip()]
    bad = [r for r in rlist if r not in READOUTS]
    if bad:
        fail(f"Unknown readout(s) {bad}; use some of {', '.join(READOUTS)}.")
    cfg = SweepConfig(
        target=target,
        category=category,
        layers=parse_layers(layers),
        strengths=parse_floats(strengths, "strengths"),
        readouts=rlist,
        n_questions=questions,
        confirm_questions=confirm_questions,
        off_target_bound=off_target_bound,
        kl_bound=kl_bound,
        seed=seed,
        units=units,
    )
    check_units(units, None)
    lm = load_model(model, dtype=dtype, device=device)
    res = run_sweep(lm, cfg)
    paths = res.write(out)
    t = Table(title=f"sweep {target}: unsteered share {res.baseline['target_rate']:.4f}")
    for col in ("", "readout", "layer", "strength", "target", "off-target", "gain", "KL"):
        t.add_column(col)
    for name, c in (("best (bounded)", res.best), ("best (any)", res.best_unbounded)):
        if c:
            t.add_row(
                name,
                c.readout,
                str(c.layer),
                f"{c.strength:g}",
                f"{c.target_rate:.4f}",
                f"{c.off_target} {c.off_target_rate:.3f}",
                f"{c.off_target_gain:+.3f}",
                f"{c.kl:.3f}",
            )
    console.print(t)
    if res.best is None:
        console.print(
            f"No cell within bounds (off-target gain <= {off_target_bound}, KL <= {kl_bound})."
        )
    console.print(
        f"{len(res.cells)} cells in {sum(res.timings.values()) - res.timings['per_cell_s']:.0f} s; "
        f"wrote {paths['csv'].parent}/ (sweep.csv, sweep.json, heatmap_*.png, vectors_*.safetensors)"
    )
