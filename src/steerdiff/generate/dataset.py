"""Dataset files: resumable, filtered writing of generated rows, and the one dataset reader.

A dataset `<name>.jsonl` (one row per line: id, messages, completion_ids, optional
top-k log-probs) comes with `<name>.progress.jsonl` (what was processed, for resuming)
and `<name>.manifest.json`, written last: a dataset without a manifest is incomplete.
See docs/dataset-format.md.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SteerdiffError
from ..io import (
    append_jsonl,
    atomic_write_json,
    provenance,
    read_json,
    read_jsonl,
    repair_jsonl,
)
from ..models import LoadedModel
from .sampler import Sample, SampleStats


class DatasetError(SteerdiffError, RuntimeError):
    """A dataset could not be written or read; the message says why and what to do."""


def manifest_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".manifest.json")


def progress_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".progress.jsonl")


def check_writable(out: str | os.PathLike) -> Path:
    """Fail early (before loading models) if the output file cannot be created."""
    out = Path(out)
    if out.suffix != ".jsonl":
        raise DatasetError(f"--out must end in .jsonl (got {out})")
    if out.is_dir():
        raise DatasetError(f"Output path {out} is a folder; give a file name ending in .jsonl")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        existed = out.exists()
        with open(out, "a"):
            pass
        if not existed:
            out.unlink()
        probe = out.parent / f".{out.name}.write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise DatasetError(f"Cannot write the dataset to {out}: {e.strerror or e}") from e
    return out


@dataclass
class Judged:
    """What a task's filter says about one completion."""

    ok: bool
    reason: str = ""  # why it was rejected ("" when ok)


def write_dataset(
    out: str | os.PathLike,
    prompts: Sequence[str],
    generate_chunk: Callable[[list[int]], tuple[list[Sample], SampleStats]],
    judge: Callable[[str, Sample], Judged],
    decode: Callable[[list[int]], str],
    run_info: dict,
    manifest_extra: dict | None = None,
    chunk_size: int = 64,
    target_valid: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    before: Callable[[], dict] | None = None,
    finalize: Callable[[dict], dict] | None = None,
) -> dict:
    """Generate, filter and append rows in chunks; resumable; returns the manifest.

    prompts: user prompts (what the student sees), indexed by position.
    generate_chunk(indices) -> (samples in the order of indices, stats).
    judge(text, sample) -> Judged; decode(token ids without the stop token) -> text.
    run_info: what must match to resume (teacher spec, seed, constrained...).
    before(): run once per dataset (not again on resume) before generating; its dict
    is kept in the progress file and merged into the manifest (e.g. a probe batch).
    finalize(manifest) -> manifest: last changes before the manifest is written.
    Files: `<out>.jsonl` (valid rows, appended with fsync), `<out>.progress.jsonl`
    (run_info first, then one line per processed prompt and per chunk), and
    `<out>.manifest.json`, written last (atomically): a dataset without a manifest
    is incomplete. Re-running with the same run_info continues where it stopped.
    """
    out = check_writable(out)
    man, prog = manifest_path(out), progress_path(out)
    if overwrite:
        for p in (out, man, prog):
            p.unlink(missing_ok=True)
    if man.exists():
        raise DatasetError(
            f"{out} is already complete (its manifest {man.name} exists); "
            "use --overwrite or another --out."
        )
    done_ids: set[int] = set()
    rejects: Counter[str] = Counter()
    n_valid, gen_tokens, gen_seconds, prompt_tokens = 0, 0, 0.0, 0
    before_info: dict | None = None
    if prog.exists() or out.exists():
        repair_jsonl(prog)
        repair_jsonl(out)
        lines = list(read_jsonl(prog)) if prog.exists() else []
        if lines and lines[0].get("run") != json.loads(json.dumps(run_info, default=str)):
            raise DatasetError(
                f"{out} holds a partial dataset made with other settings "
                f"({_diff(lines[0].get('run', {}), run_info)}); use --overwrite or another --out."
            )
        if not lines and out.exists() and out.stat().st_size > 0:
            raise DatasetError(f"{out} exists without a progress file; use --overwrite.")
        for line in lines[1:]:
            if "id" in line:
                done_ids.add(line["id"])
                if not line["ok"]:
                    rejects[line["reason"]] += 1
            elif "before" in line:
                before_info = line["before"]
            elif "chunk" in line:
                gen_tokens += line["new_tokens"]
                gen_seconds += line["seconds"]
                prompt_tokens += line["prompt_tokens"]
        valid_ids = {r["id"] for r in read_jsonl(out)} if out.exists() else set()
        done_ids |= valid_ids
        n_valid = len(valid_ids)
    if not prog.exists() or prog.stat().st_size == 0:
        append_jsonl(prog, [{"run": run_info}])
    out.touch()
    if before is not None and before_info is None:
        before_info = before()
        append_jsonl(prog, [{"before": before_info}])
    todo = [i for i in range(len(prompts)) if i not in done_ids]
    if progress is not None:
        progress(len(prompts) - len(todo))
    for c in range(0, len(todo), chunk_size):
        if target_valid is not None and n_valid >= target_valid:
            break
        chunk = todo[c : c + chunk_size]
        samples, stats = generate_chunk(chunk)
        rows, marks = [], []
        for i, s in zip(chunk, samples, strict=True):
            ids = s.token_ids[:-1] if s.stopped else s.token_ids
            text = decode(ids)
            verdict = judge(text, s)
            marks.append({"id": i, "ok": verdict.ok, "reason": verdict.reason})
            if verdict.ok:
                row: dict[str, Any] = {
                    "id": i,
                    "messages": [
                        {"role": "user", "content": prompts[i]},
                        {"role": "assistant", "content": text},
                    ],
                    "completion_ids": s.token_ids,
                }
                if s.topk_ids:
                    row["topk_ids"] = s.topk_ids
                    row["topk_logprobs"] = s.topk_logprobs
                rows.append(row)
            else:
                rejects[verdict.reason] += 1
        append_jsonl(out, rows)  # rows first: a kill in between only redoes rejected prompts
        append_jsonl(
            prog,
            marks
            + [
                {
                    "chunk": chunk[0],
                    "new_tokens": stats.new_tokens,
                    "prompt_tokens": stats.prompt_tokens,
                    "seconds": round(stats.seconds, 4),
                }
            ],
        )
        n_valid += len(rows)
        gen_tokens += stats.new_tokens
        prompt_tokens += stats.prompt_tokens
        gen_seconds += stats.seconds
        if progress is not None:
            progress(len(chunk))
    n_processed = n_valid + sum(rejects.values())
    if n_valid == 0:
        for p in (out, prog):
            p.unlink(missing_ok=True)
        raise DatasetError(
            f"No valid rows: all {n_processed} completions were rejected by the filter "
            f"({_fmt_rejects(rejects)}). Nothing was written. Try constrained decoding "
            "(--constrained), more prompts, or check the teacher."
        )
    manifest = {
        **(manifest_extra or {}),
        **run_info,
        **(before_info or {}),
        "n_prompts": n_processed,
        "n_valid": n_valid,
        "valid_rate": round(n_valid / max(n_processed, 1), 4),
        "rejects": dict(rejects.most_common()),
        "generated_tokens": gen_tokens,
        "prompt_tokens": prompt_tokens,
        "generation_seconds": round(gen_seconds, 2),
        "tokens_per_second": round(gen_tokens / gen_seconds, 2) if gen_seconds else 0.0,
        "system_prompt_in_data": False,
        "files": {"data": out.name, "progress": prog.name},
    }
    if finalize is not None:
        manifest = finalize(manifest)
    atomic_write_json(man, manifest)
    return manifest


def _fmt_rejects(rejects: Counter[str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in rejects.most_common()) or "no rows processed"


def _diff(a: dict, b: dict) -> str:
    b = json.loads(json.dumps(b, default=str))
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "differs in " + ", ".join(keys[:5]) if keys else "unknown difference"


def load_dataset(path: str | os.PathLike, require_complete: bool = True) -> tuple[list[dict], dict]:
    """Read a dataset: (rows, manifest). The one reader for `generate` output and fit input.

    Rows are sorted by id when every row has one (a resumed dataset can hold them out
    of order), else kept in file order (plain JSONL of {"messages": [...]} rows).
    require_complete: refuse a dataset whose manifest is missing (generation was
    interrupted; re-run the same command to finish it). With require_complete=False a
    dataset without a manifest loads with manifest {}.
    Raises DatasetError when the file is missing, has no manifest (if required) or no rows.
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
    if man.exists():
        manifest: dict = read_json(man)  # FileFormatError names the file if it is broken
    elif require_complete:
        raise DatasetError(
            f"{path} has no manifest ({man.name}): generation did not finish. Re-run the "
            "same `steerdiff generate` command to resume it."
        )
    else:
        manifest = {}
    rows = list(read_jsonl(path))
    if not rows:
        raise DatasetError(f"Dataset {path} is empty: nothing to fit. Generate data first.")
    if all("id" in r for r in rows):
        rows.sort(key=lambda r: r["id"])
    return rows, manifest


def generation_provenance(lm: LoadedModel, seed: int, config: dict) -> dict:
    """The provenance block of a generated dataset (model, seed, config, versions)."""
    return provenance(lm, config=config, seed=seed)
