"""Which dtype a model loads in: the names `--dtype` accepts, and what "auto" picks.

``dtype="auto"`` (the default of `load_model`, the CLI and experiment files) is bfloat16
where the hardware computes it faster than float32, and float32 elsewhere:

    pick_dtype("cpu", {"amx_bf16", ...})   # (torch.bfloat16, "bfloat16: CPU has amx_bf16")

- CUDA (Ampere and later): bfloat16 (tensor cores).
- CPU with AMX (`amx_bf16`, Sapphire Rapids and later): bfloat16; AMX tiles run bfloat16
  matmuls several times faster than float32 (4.6x reported on a Xeon with AMX).
- CPU with AVX-512 BF16 but no AMX: float32. Measured on this project's machine kind (a
  Xeon VM exposing avx512_bf16, no AMX; torch 2.13, oneDNN's avx512_core_bf16 kernels),
  bfloat16 is slower: a 1024x576 by 576x1536 matmul 83 vs 145 GFLOP per CPU-second, the
  embedded model's forward pass 267 vs 415 tokens per CPU-second (0.64x), on one thread.
- anything else: float32 (bfloat16 is emulated there).

What users read (log-probs, losses, scorer softmaxes, trainable vectors and their
optimiser state) is computed in float32 whatever the model's dtype: docs/models.md lists
where. `--dtype bfloat16` still loads bfloat16 anywhere (half the memory).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
AUTO = "auto"  # bfloat16 where the hardware runs it faster (pick_dtype), else float32
DTYPE_NAMES = [AUTO, *DTYPES]
# CPU flags (Linux /proc/cpuinfo) with which auto picks bfloat16: AMX tiles. AVX-512 BF16
# alone is not enough: measured 0.64x float32's forward speed (see above).
BF16_CPU_FLAGS = ("amx_bf16",)
AVX512_BF16 = "avx512_bf16"


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the spelling provenance and stage keys use)."""
    return str(dtype).replace("torch.", "")


def cpu_flags(path: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (its first "flags" line); an empty set
    where that file is missing or unreadable (macOS, Windows): `pick_dtype` then says
    float32."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def pick_dtype(
    device_type: str, flags: set[str], cuda_bf16: bool = True
) -> tuple[torch.dtype, str]:
    """What `dtype="auto"` means on this hardware, and why: (dtype, reason).

    bfloat16 on a CUDA GPU that computes it (`cuda_bf16`: Ampere and later) and on a CPU
    with AMX (`flags`, e.g. from `cpu_flags()`), where bfloat16 matmuls run several times
    faster than float32; float32 everywhere else, AVX-512 BF16 without AMX included (slower
    in bfloat16, measured: see the module docstring). A pure function: tests give it flags."""
    if device_type == "cuda":
        if cuda_bf16:
            return torch.bfloat16, "bfloat16: CUDA GPU with bfloat16"
        return torch.float32, "float32: this CUDA GPU does not compute bfloat16 natively"
    if device_type != "cpu":
        return torch.float32, f"float32: no bfloat16 rule for device {device_type!r}"
    have = [f for f in BF16_CPU_FLAGS if f in flags]
    if have:
        return torch.bfloat16, f"bfloat16: CPU has {' and '.join(have)}"
    if AVX512_BF16 in flags:
        return torch.float32, (
            "float32: CPU has avx512_bf16 but no AMX (bfloat16 measured 0.64x float32's "
            "speed there)"
        )
    return torch.float32, "float32: CPU has no AMX"
