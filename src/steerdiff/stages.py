"""Content-addressed, resumable pipeline stages.

A stage's folder name is `{name}-{key}` where key hashes everything the stage depends
on (its own settings and its inputs' keys). A finished stage has `stage.json` and is
never run again; an interrupted one left a `{name}-{key}.partial` folder that the next
run passes back to the stage function so it can resume (e.g. generation continues its
JSONL). The folder is renamed into place only when the stage function returns, so a
stage is either complete or visibly partial.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import atomic_write_json, read_json


def stage_key(obj: Any) -> str:
    """A short stable hash of a JSON-able object (dict keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class StageResult:
    name: str
    key: str
    path: Path
    cached: bool  # True when a finished folder was found and nothing ran
    seconds: float
    info: dict  # what the stage function returned (also in stage.json)


def run_stage(
    run_dir: str | os.PathLike,
    name: str,
    depends_on: Any,
    fn: Callable[[Path], dict | None],
    provenance: dict | None = None,
) -> StageResult:
    """Run fn(work_dir) unless a finished stage with the same key exists.

    fn writes its outputs into work_dir and returns a small JSON-able summary. If it is
    interrupted, the partial folder stays; calling again resumes in the same folder.
    """
    run_dir = Path(run_dir)
    key = stage_key({"stage": name, "depends_on": depends_on})
    final = run_dir / f"{name}-{key}"
    marker = final / "stage.json"
    if marker.exists():
        meta = read_json(marker)
        return StageResult(name, key, final, True, 0.0, meta.get("info", {}))
    work = run_dir / f"{name}-{key}.partial"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = fn(work) or {}
    seconds = time.perf_counter() - t0
    atomic_write_json(
        work / "stage.json",
        {
            "stage": name,
            "key": key,
            "depends_on": depends_on,
            "info": info,
            "seconds": round(seconds, 2),
            "provenance": provenance or {},
        },
    )
    os.replace(work, final)
    return StageResult(name, key, final, False, seconds, info)
