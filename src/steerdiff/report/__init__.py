"""Self-contained HTML reports; `build_report(run_dir)` writes an experiment run's page.

The report reads only the run folder (see run_folder.py), never the pipeline.
"""

from __future__ import annotations

import os
from pathlib import Path


def build_report(run_dir: str | os.PathLike) -> Path:
    """Write run_dir/report.html from the run folder's files; returns its path."""
    from .experiment import build_report as build  # matplotlib only when a report is built

    return build(run_dir)


__all__ = ["build_report"]
