"""Text generation: the batched KV-cache sampler, dataset files, the optional vLLM backend.

sampler.py   sample(), Sample, SampleStats, stop_token_ids: our decoding loop
dataset.py   write_dataset (resumable, filtered), load_dataset (the one reader), paths
vllm.py      VllmSampler: the same sample() interface on vLLM (optional)
"""

from __future__ import annotations

from .dataset import (
    DatasetError,
    Judged,
    check_writable,
    generation_provenance,
    load_dataset,
    manifest_path,
    progress_path,
    write_dataset,
)
from .sampler import Sample, SampleError, SampleStats, sample, stop_token_ids

__all__ = [
    "DatasetError",
    "Judged",
    "Sample",
    "SampleError",
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
