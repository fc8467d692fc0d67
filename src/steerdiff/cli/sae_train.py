"""`steerdiff sae train`: (being written for issue 15)."""

from __future__ import annotations

from .sae_app import app  # noqa: F401  (commands here are added to the `sae` group)
