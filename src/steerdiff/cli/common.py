"""What every command shares: the console, `fail`, the one error handler and common options.

Errors: a command raises (or lets through) any `SteerdiffError`; `one_line_errors` turns it
into the one-line `error: ...` message and exit code 2. It is applied once, around every
command, by `ErrorsAsOneLine` (the class of the root command group), so commands hold no
try/except of their own for the package's errors. A pydantic `ValidationError` (a config
built from command-line options, e.g. FitConfig) becomes one line naming the option.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import click
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from steerdiff.errors import SteerdiffError

console = Console()

DEFAULT_MODEL = "default"
MODEL_HELP = (
    "'default' (embedded SmolLM2-135M-Instruct), 'gemma3-270m', a hub id, a folder or a .gguf file"
)

# Options shared by the commands that load a model.
ModelOpt = Annotated[str, typer.Option("--model", help=MODEL_HELP)]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="auto (bfloat16 on CUDA and on CPUs with AMX, else float32), float32 or bfloat16",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda")]
ThreadsOpt = Annotated[
    int,
    typer.Option("--threads", help="torch CPU threads (0 = default; 1 is fastest on a busy CPU)"),
]
# How a command is given a steering vector or a finetune (generate's teachers, eval).
VectorsOpt = Annotated[
    str | None, typer.Option("--vectors", help="steer with this VectorSet (.safetensors)")
]
CorpusOpt = Annotated[
    str,
    typer.Option("--corpus", help="'default', a .txt/.jsonl file, a folder, or an HF dataset name"),
]
TokensOpt = Annotated[int, typer.Option("--tokens", help="tokens per text")]
FirstKOpt = Annotated[int, typer.Option("--first-k", help="positions read separately")]
CoeffOpt = Annotated[float, typer.Option(help="steering coefficient (with --vectors)")]
PositionsOpt = Annotated[
    str, typer.Option(help="steered positions: all | prompt | response | first:k")
]
AdapterOpt = Annotated[
    str | None, typer.Option("--adapter", help="PEFT adapter or finetuned model folder")
]
# The old spelling `steerdiff info MODEL` / `steerdiff sweep MODEL`: accepted for one release.
OldModelArg = Annotated[
    str | None,
    typer.Argument(
        metavar="MODEL",
        show_default=False,
        help="deprecated spelling of --model (accepted until the next release)",
    ),
]


def fail(msg: str, code: int = 2) -> NoReturn:
    """Print a one-line error (no traceback) and exit."""
    # escape: a message's own brackets ("[batch, pos]") are text, not rich markup
    console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)  # one line
    raise typer.Exit(code)


# Config fields whose option is spelled other than --field-name (kept from older releases).
OPTION_SPELLINGS = {"max_steps": "--steps", "early_stopping_patience": "--patience"}


def option_flag(field: str) -> str:
    """The command-line spelling of a config field: val_size -> --val-size, max_steps -> --steps."""
    return OPTION_SPELLINGS.get(field, "--" + field.replace("_", "-"))


def bad_options_message(errors: list[dict[str, Any]]) -> str:
    """One line for pydantic validation errors of options, e.g. `bad option --lr: ...`."""
    parts = []
    for err in errors:
        loc = err.get("loc") or ()
        where = f" {option_flag(str(loc[0]))}" if loc else ""
        parts.append(f"bad option{where}: {err['msg']}")
    return "; ".join(parts)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn a SteerdiffError (or a ValidationError of options) into `error: ...`, exit 2.

    Other exceptions (bugs) keep their traceback.
    """
    try:
        yield
    except SteerdiffError as e:
        fail(str(e))
    except ValidationError as e:
        fail(bad_options_message(e.errors()))


class ErrorsAsOneLine(TyperGroup):
    """The root command group: runs every command (and sub-group) inside one_line_errors."""

    def invoke(self, ctx: click.Context) -> Any:
        with one_line_errors():
            return super().invoke(ctx)


def pick_model(option: str, old_positional: str | None, command: str) -> str:
    """The model to load: --model, or the deprecated positional MODEL (with a note on stderr)."""
    if old_positional is None:
        return option
    if option not in (DEFAULT_MODEL, old_positional):
        fail(f"two models given ({old_positional!r} and --model {option!r}); give --model only")
    typer.echo(
        f"note: `steerdiff {command} MODEL` is deprecated and goes in the next release; "
        f"use `steerdiff {command} --model MODEL`.",
        err=True,
    )
    return old_positional
