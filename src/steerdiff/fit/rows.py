"""Where a fit's rows come from (a JSONL file with or without a manifest, a Hugging Face
dataset, a list) and the provenance a fit records of them (fit.data.data_provenance)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..generate import DatasetError, load_dataset
from ..hubdata import HF_PREFIX, load_hf_rows
from ..io import file_sha256
from .config import FitError


@dataclass
class Rows:
    """Dataset rows and where they came from, so an error can name the file and line."""

    rows: list
    manifest: dict = field(default_factory=dict)
    path: Path | None = None
    label: str | None = None  # where rows not from a file came from (e.g. "hf:ORG/NAME:train")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def source(self) -> str:
        if self.path is not None:
            return str(self.path)
        return self.label or "the rows given"

    def where(self, i: int) -> str:
        """'data.jsonl line 7' for a file (found on demand: only errors need it), else 'row 7'."""
        row = self.rows[i]
        rid = row.get("id") if isinstance(row, dict) else None
        if self.path is not None:
            by_id = all(isinstance(r, dict) and "id" in r for r in self.rows)
            line = _line_number(self.path, i, rid if by_id else None)
            if line is not None:
                return f"{self.path} line {line}"
        where = f"{self.label} row {i}" if self.label else f"row {i}"
        return where + (f" (id={rid})" if rid is not None else "")


def _line_number(path: Path, i: int, rid: Any) -> int | None:
    """The file line of row i (file order) or of the row whose id is rid (rows sorted by id)."""
    n = -1
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            n += 1
            if rid is None and n == i:
                return lineno
            if rid is not None:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict) and obj.get("id") == rid:
                    return lineno
    return None


def read_rows(path: str | os.PathLike) -> Rows:
    """Rows of a dataset JSONL and its manifest ({} if absent), via generate.load_dataset;
    or, for "hf:ORG/NAME[:split]", a Hugging Face dataset's rows (steerdiff.hubdata)."""
    if isinstance(path, str) and path.startswith(HF_PREFIX):
        rows, label = load_hf_rows(path)
        return Rows(rows, {}, None, label)
    try:
        rows, manifest = load_dataset(path, require_complete=False)
    except DatasetError as e:
        raise FitError(str(e)) from e
    return Rows(rows, manifest, Path(path))


def rows_sha256(rows: Sequence[Any]) -> str:
    """sha256 of rows given in memory (or from the hub), as canonical JSON lines."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
    return h.hexdigest()


def provenance_of(rows: Rows, fmt: str, examples: int | None, chunks: int | None) -> dict:
    """{"format", "sha256", "rows", "examples", "chunks", "source"} (see data_provenance)."""
    is_ex = fmt == "examples"
    sha = file_sha256(rows.path) if rows.path is not None else None
    if sha is None and not is_ex:
        sha = rows_sha256(rows.rows)
    return {
        "format": fmt,
        "sha256": sha,
        "rows": len(rows.rows),
        "examples": examples,
        "chunks": chunks,
        "source": rows.source,
        "manifest": bool(rows.manifest),
    }
