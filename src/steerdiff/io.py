"""Atomic file writes, JSONL, file hashes, and the provenance block every artifact carries."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import SteerdiffError


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give a finished temp file normal permissions (mkstemp makes 0600) and rename it."""
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` for a writer that needs a file name; on success the
    finished file replaces `path`, on error it is removed (no partial file is left)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


class FileFormatError(SteerdiffError, ValueError):
    """A JSON / JSONL file that does not parse; the message names the file and the line."""


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; FileFormatError (naming the file) if it does not parse."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise FileFormatError(
                f"{path} is not valid JSON ({e.msg} at line {e.lineno}): fix or delete the file."
            ) from None


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append rows and fsync, so a kill loses at most the line being written."""
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Rows of a JSONL file; a torn last line (from a kill mid-write) is skipped."""
    with open(path) as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                return  # torn final line
            raise FileFormatError(f"{path}: line {i + 1} is not valid JSON") from None


def repair_jsonl(path: str | os.PathLike) -> int:
    """Drop a torn last line in place (before appending after a kill); returns rows kept."""
    path = Path(path)
    if not path.exists():
        return 0
    rows = list(read_jsonl(path))
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))
    return len(rows)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (full hex digest), read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def provenance(model: Any = None, config: Any = None, seed: int | None = None) -> dict:
    """What made an artifact: model id and weights hash, config, seed, package versions."""
    from .version import __version__

    prov: dict[str, Any] = {
        "steerdiff_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import transformers

        prov["transformers_version"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if model is not None and hasattr(model, "provenance"):
        prov.update(model.provenance())
    if config is not None:
        prov["config"] = config.model_dump() if hasattr(config, "model_dump") else config
    if seed is not None:
        prov["seed"] = seed
    return prov
