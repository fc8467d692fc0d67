"""Which dtype a model loads in: the names `--dtype` accepts, and what "auto" picks.

``dtype="auto"`` (the default of `load_model`, the CLI and experiment files) is bfloat16
where the hardware computes it natively and float32 elsewhere:

    pick_dtype("cpu", cpu_flags())   # (torch.bfloat16, "bfloat16: CPU has avx512_bf16")

On a CPU with AMX or AVX-512 BF16 a bfloat16 matmul runs several times faster than a
float32 one (4.6x measured on a Xeon with both); without them bfloat16 is emulated and
slower, so auto stays float32. What users read (log-probs, losses, scorer softmaxes,
trainable vectors and their optimiser state) is computed in float32 whatever the model's
dtype: docs/models.md lists where.
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
AUTO = "auto"  # bfloat16 where the hardware has it (pick_dtype), else float32
DTYPE_NAMES = [AUTO, *DTYPES]
# CPU flags (Linux /proc/cpuinfo) of the units that compute bfloat16 matmuls natively:
# AMX tiles (Sapphire Rapids and later) and AVX-512 BF16 (Cooper Lake, Zen 4 and later).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


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
    with AMX or AVX-512 BF16 (`flags`, e.g. from `cpu_flags()`), where bfloat16 matmuls run
    several times faster than float32; float32 everywhere else (there bfloat16 is emulated
    and slower). A pure function: tests give it flags."""
    if device_type == "cuda":
        if cuda_bf16:
            return torch.bfloat16, "bfloat16: CUDA GPU with bfloat16"
        return torch.float32, "float32: this CUDA GPU does not compute bfloat16 natively"
    if device_type != "cpu":
        return torch.float32, f"float32: no bfloat16 rule for device {device_type!r}"
    have = [f for f in BF16_CPU_FLAGS if f in flags]
    if have:
        return torch.bfloat16, f"bfloat16: CPU has {' and '.join(have)}"
    return torch.float32, "float32: CPU has no AMX or AVX-512 BF16"
