"""`steerdiff info`: a model's family, sizes and hook point names."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import DeviceOpt, DtypeOpt, ModelOpt, OldModelArg, console, pick_model

app = typer.Typer()


@app.command()
def info(
    old_model: OldModelArg = None,
    model: ModelOpt = "default",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Load a model and show its family, size and hook point names."""
    from rich.table import Table

    from steerdiff.hooks import describe, list_hook_points
    from steerdiff.models import load_model

    model = pick_model(model, old_model, "info")
    lm = load_model(model, dtype=dtype, device=device)
    d = describe(lm)
    if as_json:
        print(json.dumps({**d, "hook_points": list_hook_points(lm.model)}, indent=2))
        return
    t = Table(title=f"steerdiff info: {model}", show_header=False)
    for k, v in d.items():
        if k != "hook_point_names_layer0":
            t.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    console.print(t)
    console.print("[bold]Hook points[/] (per layer l = 0.." + str(d["n_layers"] - 1) + "):")
    for name in d["hook_point_names_layer0"]:
        console.print("  " + name.replace("blocks.0.", "blocks.{l}."))
    console.print(
        "Select sets with globs, e.g. 'blocks.*.attn.hook_{q,k,v}' or 'blocks.20-29.hook_resid_post'."
    )
