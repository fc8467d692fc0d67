"""Text generation: the batched KV-cache sampler, dataset files, the optional vLLM backend."""

from __future__ import annotations

from .sampler import (  # noqa: F401
    PREALLOCATE,
    DatasetError,
    Judged,
    PreallocCache,
    Sample,
    SampleStats,
    check_writable,
    generation_provenance,
    load_dataset,
    manifest_path,
    progress_path,
    sample,
    stop_token_ids,
    write_dataset,
)

__all__ = [
    "DatasetError",
    "Judged",
    "PREALLOCATE",
    "PreallocCache",
    "Sample",
    "SampleStats",
    "check_writable",
    "generation_provenance",
    "load_dataset",
    "manifest_path",
    "progress_path",
    "sample",
    "stop_token_ids",
    "write_dataset",
]
