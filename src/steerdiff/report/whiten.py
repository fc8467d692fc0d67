"""The report's whiten section (issue 16; placeholder, being written)."""

from __future__ import annotations

from .html import Report
from .run_folder import RunFolder


def whiten_sections(r: Report, run: RunFolder) -> None:
    """Sections from the run's whiten stage; placeholder: none yet."""
    return None
