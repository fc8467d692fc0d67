"""Open a report in headless Chromium and read back what a person would see."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import SteerdiffError

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=5000",
]


class BrowserError(SteerdiffError, RuntimeError):
    """No browser to view the report with; the message says what to install."""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class BrowserView:
    dom: str  # the DOM after the page's load handlers ran
    section_titles: list[str]
    n_images: int
    n_images_decoded: int


def view_in_chromium(
    path: str | os.PathLike, screenshot: str | os.PathLike | None = None
) -> BrowserView:
    """Render an HTML file in headless Chromium; optionally save a PNG screenshot."""
    exe = find_chromium()
    if exe is None:
        raise BrowserError(
            "No Chromium found: install Debian's `chromium` package (install.sh does)."
        )
    url = Path(path).resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run(
            [exe, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
        ).stdout
        if screenshot is not None:
            subprocess.run(
                [
                    exe,
                    *flags,
                    f"--screenshot={Path(screenshot).resolve()}",
                    "--window-size=1200,2400",
                    url,
                ],
                capture_output=True,
                timeout=120,
            )
    titles = re.findall(r"<h2>(.*?)</h2>", dom)
    m_all = re.search(r'data-images="(\d+)"', dom)
    m_ok = re.search(r'data-images-ok="(\d+)"', dom)
    return BrowserView(
        dom=dom,
        section_titles=titles,
        n_images=int(m_all.group(1)) if m_all else -1,
        n_images_decoded=int(m_ok.group(1)) if m_ok else -1,
    )
