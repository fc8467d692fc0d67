"""The report's melbo section (issue 16; placeholder, being written)."""

from __future__ import annotations

from .html import Report
from .run_folder import RunFolder


def melbo_sections(r: Report, run: RunFolder) -> None:
    """Sections from the run's melbo stage; placeholder: none yet."""
    return None
