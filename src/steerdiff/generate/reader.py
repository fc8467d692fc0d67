"""The dataset file layout (data, progress, manifest, partial) and the one dataset reader.

`load_dataset` reads what `write_dataset` (dataset.py) writes, and any plain JSONL of
{"messages": [...]} rows (fit's input). Every error names the file (and the line) and the fix.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..errors import SteerdiffError
from ..io import FileFormatError, read_json, read_jsonl_lines


class DatasetError(SteerdiffError, RuntimeError):
    """A dataset could not be written or read; the message says why and what to do."""


def manifest_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".manifest.json")


def progress_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".progress.jsonl")


def partial_path(out: str | os.PathLike) -> Path:
    """Where `--overwrite` writes the new dataset until it replaces the old one."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".partial.jsonl")


def load_dataset(path: str | os.PathLike, require_complete: bool = True) -> tuple[list[dict], dict]:
    """Read a dataset: (rows, manifest). The one reader for `generate` output and fit input.

    Rows are sorted by id when every row has one (a resumed dataset can hold them out
    of order), else kept in file order (plain JSONL of {"messages": [...]} rows).
    require_complete: refuse a dataset whose manifest is missing (generation was
    interrupted; re-run the same command to finish it). With require_complete=False a
    dataset without a manifest loads with manifest {}.
    Every line must be one JSON object: anything else is a DatasetError naming
    `file:line`. The one exception: an interrupted dataset (a progress file and no
    manifest) may end in a torn line, which is skipped with a warning.
    Raises DatasetError when the file is missing, has no manifest (if required), a bad
    line or manifest, or no rows.
    """
    path = Path(path)
    man = manifest_path(path)
    if path.is_dir():
        raise DatasetError(f"Dataset path {path} is a folder; give the dataset's .jsonl file.")
    if not path.exists():
        raise DatasetError(
            f"Dataset not found: {path} (no such file). Check the path, or write one "
            "with `steerdiff generate --out ...`."
        )
    interrupted = not man.exists() and progress_path(path).exists()
    if man.exists():
        manifest = read_manifest(man)
    elif require_complete:
        raise DatasetError(
            f"{path} has no manifest ({man.name}): generation did not finish. Re-run the "
            "same `steerdiff generate` command to resume it."
        )
    else:
        manifest = {}
    rows = _read_rows(path, torn_tail_ok=interrupted, generated=bool(manifest))
    if not rows:
        raise DatasetError(f"Dataset {path} is empty: nothing to fit. Generate data first.")
    if all("id" in r for r in rows):
        rows.sort(key=lambda r: r["id"])
    return rows, manifest


def _read_rows(path: Path, torn_tail_ok: bool, generated: bool) -> list[dict]:
    """Every line of a dataset as a dict; DatasetError naming file:line otherwise."""

    def torn(n: int) -> None:
        warnings.warn(
            f"{path}:{n}: the last line is torn (generation was interrupted, see "
            f"{progress_path(path).name}); it is skipped. Re-run the same `steerdiff "
            "generate` command to finish the dataset (it repairs the line).",
            stacklevel=5,  # the caller of load_dataset
        )

    fix = " (or re-run `steerdiff generate` with --overwrite)" if generated else ""
    rows = []
    try:
        for n, row in read_jsonl_lines(path, on_torn=torn if torn_tail_ok else None):
            if not isinstance(row, dict):
                raise DatasetError(
                    f"{path}:{n}: a row must be a JSON object like "
                    f'{{"messages": [...]}}, not a JSON {_json_type(row)}; fix or delete '
                    f"that line{fix}."
                )
            rows.append(row)
    except FileFormatError as e:
        raise DatasetError(f"{str(e).removesuffix('.')}{fix}.") from None
    return rows


def _json_type(value: object) -> str:
    names = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


def read_manifest(man: Path) -> dict:
    """A dataset's manifest; DatasetError naming the file and the fix if it is broken."""
    data = man.with_name(man.name.removesuffix(".manifest.json") + ".jsonl")
    if progress_path(data).exists():
        fix = (
            f"delete it and re-run the same `steerdiff generate` command (it rewrites the "
            f"manifest from {progress_path(data).name}), or restore it"
        )
    else:
        fix = "restore it, or delete it to read the rows as a plain JSONL dataset"
    try:
        manifest = read_json(man)
    except FileFormatError as e:
        reason = str(e).removeprefix(str(man)).split(": fix or delete")[0].strip()
        raise DatasetError(f"The dataset manifest {man} {reason}: {fix}.") from None
    if not isinstance(manifest, dict):
        raise DatasetError(
            f"The dataset manifest {man} is not a JSON object (a JSON {_json_type(manifest)}): {fix}."
        )
    return manifest
