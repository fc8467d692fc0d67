"""One self-contained HTML page per experiment: text, tables, embedded PNG plots, provenance.

A report is a list of sections; each section a list of blocks. Plots are embedded as
base64 PNG so the page can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import atomic_write_text


@dataclass
class Text:
    text: str  # plain text; blank lines separate paragraphs
    kind: str = "p"  # "p" or "note" (highlighted) or "warn"


@dataclass
class Table:
    rows: list[dict[str, Any]]
    caption: str = ""
    digits: int = 4


@dataclass
class Figure:
    png: bytes  # PNG bytes
    caption: str = ""

    @classmethod
    def from_matplotlib(cls, fig: Any, caption: str = "") -> Figure:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        return cls(buf.getvalue(), caption)

    @classmethod
    def from_file(cls, path: str | os.PathLike, caption: str = "") -> Figure:
        return cls(Path(path).read_bytes(), caption)


@dataclass
class Code:
    obj: Any  # shown as pretty JSON
    caption: str = ""


@dataclass
class Html:
    html: str  # markup a section builder made, its own text escaped (e.g. report.sae)


Block = Text | Table | Figure | Code | Html


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    anchor: str = ""

    def add(self, block: Block) -> Section:
        self.blocks.append(block)
        return self


@dataclass
class Report:
    title: str
    sections: list[Section] = field(default_factory=list)
    subtitle: str = ""

    def section(self, title: str, anchor: str = "") -> Section:
        s = Section(title, anchor=anchor or _slug(title))
        self.sections.append(s)
        return s


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-")


def _fmt(v: Any, digits: int) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "n/a"
        return f"{v:.{digits}g}"
    return str(v)


def _render_block(b: Block) -> str:
    if isinstance(b, Text):
        cls = {"note": ' class="note"', "warn": ' class="warn"'}.get(b.kind, "")
        paras = [p.strip() for p in b.text.split("\n\n") if p.strip()]
        return "".join(f"<p{cls}>{html.escape(p)}</p>" for p in paras)
    if isinstance(b, Table):
        if not b.rows:
            return "<p><em>(empty table)</em></p>"
        cols: list[str] = []
        for r in b.rows:
            cols += [c for c in r if c not in cols]
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = "".join(
            "<tr>"
            + "".join(f"<td>{html.escape(_fmt(r.get(c, ''), b.digits))}</td>" for c in cols)
            + "</tr>"
            for r in b.rows
        )
        cap = f"<caption>{html.escape(b.caption)}</caption>" if b.caption else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(b, Figure):
        data = base64.b64encode(b.png).decode()
        cap = f"<figcaption>{html.escape(b.caption)}</figcaption>" if b.caption else ""
        return f'<figure><img class="plot" alt="{html.escape(b.caption)}" src="data:image/png;base64,{data}">{cap}</figure>'
    if isinstance(b, Code):
        cap = f"<p><strong>{html.escape(b.caption)}</strong></p>" if b.caption else ""
        return f"{cap}<pre>{html.escape(json.dumps(b.obj, indent=2, default=str))}</pre>"
    if isinstance(b, Html):
        return b.html
    raise TypeError(f"Unknown report block {type(b).__name__}")


def render_blocks(blocks: list[Block]) -> str:
    """The HTML of blocks (a section's content, without its heading)."""
    return "".join(_render_block(b) for b in blocks)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} .sub{color:#666;margin-top:0}
nav a{margin-right:1em} section{margin-top:2.2em;border-top:1px solid #ddd;padding-top:.6em}
table{border-collapse:collapse;margin:1em 0;font-size:.92em} caption{text-align:left;color:#555;padding:.3em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right} th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
img.plot{max-width:100%;border:1px solid #eee} figcaption{color:#555;font-size:.9em}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.82em;max-height:30em}
p.note{background:#eef6ff;padding:.6em;border-left:4px solid #4a90d9}
p.warn{background:#fff4e5;padding:.6em;border-left:4px solid #e69500}
"""

# After load, record how many images decoded, so a headless browser test can check them.
_JS = """
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  document.body.dataset.images = imgs.length;
  document.body.dataset.imagesOk = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
});
"""


def render(report: Report) -> str:
    nav = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in report.sections)
    body = "".join(
        f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>'
        + "".join(_render_block(b) for b in s.blocks)
        + "</section>"
        for s in report.sections
    )
    sub = f'<p class="sub">{html.escape(report.subtitle)}</p>' if report.subtitle else ""
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(report.title)}</title><style>{_CSS}</style>"
        f"<script>{_JS}</script></head><body><h1>{html.escape(report.title)}</h1>{sub}"
        f"<nav>{nav}</nav>{body}</body></html>"
    )


def write(report: Report, path: str | os.PathLike) -> Path:
    """Write the page atomically."""
    return atomic_write_text(path, render(report))
