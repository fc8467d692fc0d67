"""The report's fuzz section (issue 16; placeholder, being written)."""

from __future__ import annotations

from .html import Report
from .run_folder import RunFolder


def fuzz_sections(r: Report, run: RunFolder) -> None:
    """Sections from the run's fuzz stage; placeholder: none yet."""
    return None
