"""The report's profile section (issue 16; placeholder, being written)."""

from __future__ import annotations

from .html import Report
from .run_folder import RunFolder


def profile_sections(r: Report, run: RunFolder) -> None:
    """Sections from the run's profile stage; placeholder: none yet."""
    return None
