"""`steerdiff ...`: the command line. Each command is a thin wrapper over library functions.

One module per command group (info, generate, sweep, fit, run + demo, read, eval, export, sae), each
holding its commands on its own `typer.Typer`; this file adds every group to `app` the same way.
Shared options, `console`, `fail` and the one error handler live in `common`. Commands
import the library inside their bodies, so `steerdiff --help` stays fast.
"""

from __future__ import annotations

import typer

from . import (
    eval,
    export,
    fit,
    fuzz,
    generate,
    info,
    melbo,
    read,
    run,
    sae_app,
    sae_read,
    sae_train,
    sweep,
    whiten,
)
from .common import ErrorsAsOneLine, console, fail

_ = (sae_read, sae_train)  # imported for their commands on sae_app.app

__all__ = ["app", "console", "fail"]

app = typer.Typer(
    help="steerdiff: reproduce finetunes with learned steering vectors, and read them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=ErrorsAsOneLine,  # every command's SteerdiffError -> one line `error: ...`, exit 2
)


@app.callback()
def _root() -> None:
    """steerdiff: reproduce finetunes with learned steering vectors, and read them."""


# A group without a name (all but `read`, `eval` and `sae`) adds its commands at the top level.
for _group in (info, generate, sweep, fit, run, read, eval, export, sae_app, whiten, melbo, fuzz):
    app.add_typer(_group.app)
