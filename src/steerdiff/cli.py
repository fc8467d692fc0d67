"""`steerdiff ...`: the command line. Each command is a thin wrapper over library functions."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="steerdiff: reproduce finetunes with learned steering vectors, and read them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def _root() -> None:
    """steerdiff: reproduce finetunes with learned steering vectors, and read them."""


ModelOpt = Annotated[
    str,
    typer.Argument(
        help="'default' (embedded SmolLM2-135M-Instruct), 'gemma3-270m', a hub id, a folder or a .gguf file"
    ),
]


def fail(msg: str, code: int = 2) -> None:
    """Print a one-line error (no traceback) and exit."""
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


@app.command()
def info(
    model: ModelOpt = "default",
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Load a model and show its family, size and hook point names."""
    from .hooks import HookError, describe, list_hook_points
    from .models import ModelLoadError, load_model

    try:
        lm = load_model(model, dtype=dtype, device=device)
        d = describe(lm)
    except (ModelLoadError, HookError) as e:
        fail(str(e))
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


# Commands from other modules: each module defines register(app).
def _register_commands() -> None:
    from . import (
        commands_fit,
        commands_generate,
        commands_read,
        commands_run,
        commands_sweep,
    )

    for module in (commands_generate, commands_sweep, commands_fit, commands_read, commands_run):
        module.register(app)


_register_commands()


def main() -> None:  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
