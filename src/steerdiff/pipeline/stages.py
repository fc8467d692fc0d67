"""Content-addressed, resumable pipeline stages.

A stage's folder name is `{name}-{key}` where name is `{kind}-{tag}` (or just the kind)
and key hashes everything the stage depends on (its own settings and its inputs' keys).
A finished stage has `stage.json` and is never run again; an interrupted one left a
`{name}-{key}.partial` folder that the next run passes back to the stage function so it
can resume (e.g. generation continues its JSONL). The folder is renamed into place only
when the stage function returns, so a stage is either complete or visibly partial; a stage
that fails with an error before it made any progress leaves no folder at all.

stage.json describes its stage, so a reader (the report) needs no naming convention:
    {"stage": name, "kind": kind, "tag": tag, "key": ..., "depends_on": ..., "info": ...,
     "seconds": ..., "provenance": ...}
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from ..io import atomic_write_json, read_json
from ..models import LoadedModel
from ..report.run_folder import INDEX_FILE, STAGE_FILE
from .config import ExperimentConfig

console = Console(stderr=True)


def model_key(lm: LoadedModel) -> dict:
    """What a stage depends on of a model: its spec, weights hash and dtype."""
    return {"model": lm.spec, "weights_hash": lm.weights_hash, "dtype": str(lm.model.dtype)}


def stage_key(obj: Any) -> str:
    """A short stable hash of a JSON-able object (dict keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class StageResult:
    name: str  # `{kind}-{tag}`, or the kind alone
    key: str
    path: Path
    cached: bool  # True when a finished folder was found and nothing ran
    seconds: float
    info: dict  # what the stage function returned (also in stage.json)
    kind: str = ""  # what the stage does: teacher-vector, data, fit, baseline, eval, read
    tag: str | None = None  # which one of its kind (e.g. "main", "vec-s0")


def has_files(work: Path) -> bool:
    """The default test of whether a failed stage's folder holds progress: any file."""
    return any(work.iterdir())


PARTIAL = ".partial"  # a stage's folder while it runs; renamed without it once complete


def final_folder(work: Path) -> Path:
    """Where a stage's working folder (`NAME-KEY.partial`) lies once the stage completes:
    for paths a stage records about its own files."""
    return work.with_name(work.name.removesuffix(PARTIAL))


def run_stage(
    run_dir: str | os.PathLike,
    kind: str,
    depends_on: Any,
    fn: Callable[[Path], dict | None],
    provenance: dict | None = None,
    tag: str | None = None,
    has_progress: Callable[[Path], bool] = has_files,
) -> StageResult:
    """Run fn(work_dir) unless a finished stage with the same key exists.

    fn writes its outputs into work_dir and returns a small JSON-able summary. If it is
    interrupted (a kill, Ctrl-C), the partial folder stays; calling again resumes in the
    same folder. If fn raises an error, the partial folder stays only when
    `has_progress(work)` says it holds something a rerun continues from (rows written, a
    checkpoint); otherwise it is removed, so no `.partial` folder pretends to be progress.
    """
    run_dir = Path(run_dir)
    name = f"{kind}-{tag}" if tag else kind
    key = stage_key({"stage": name, "depends_on": depends_on})
    final = run_dir / f"{name}-{key}"
    marker = final / STAGE_FILE
    if marker.exists():
        meta = read_json(marker)
        if "kind" not in meta:  # written before stage.json named its kind
            atomic_write_json(marker, {**meta, "kind": kind, "tag": tag})
        return StageResult(name, key, final, True, 0.0, meta.get("info", {}), kind, tag)
    work = final.with_name(final.name + PARTIAL)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        info = fn(work) or {}
    except Exception:
        if not has_progress(work):
            shutil.rmtree(work, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    atomic_write_json(
        work / STAGE_FILE,
        {
            "stage": name,
            "kind": kind,
            "tag": tag,
            "key": key,
            "depends_on": depends_on,
            "info": info,
            "seconds": round(seconds, 2),
            "provenance": provenance or {},
        },
    )
    os.replace(work, final)
    return StageResult(name, key, final, False, seconds, info, kind, tag)


@dataclass
class RunState:
    """The stages one run has produced so far, by name; stages.json lists them in order."""

    cfg: ExperimentConfig
    run_dir: Path
    stages: dict[str, StageResult] = field(default_factory=dict)

    def add(self, res: StageResult) -> StageResult:
        self.stages[res.name] = res
        folders = [s.path.name for s in self.stages.values()]
        atomic_write_json(self.run_dir / INDEX_FILE, {"stages": folders})
        what = "cached" if res.cached else f"done in {res.seconds:.0f}s"
        console.print(f"[green]✓[/] {res.name} [dim]({what}; {res.path.name})[/]")
        return res
