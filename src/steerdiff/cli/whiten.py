"""`steerdiff whiten` (issue 16; placeholder, being written)."""

from __future__ import annotations

import typer

app = typer.Typer()
