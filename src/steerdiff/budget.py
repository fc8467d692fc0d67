"""Memory budgets for caches, and the one way a cache goes past its budget: to disk.

A cache (the fit's prefix activations, the sweep's recorded activations) keeps entries in
RAM while they fit its budget; an entry that does not fit is written to a temporary folder
and read back memory-mapped, so the operating system pages it in and out instead of the
process holding it. Values come back with the same bytes either way, so a result does not
depend on where the cache lived.

    budget = memory_budget_bytes(cfg.cache_budget)   # None: STEERDIFF_MEMORY_BUDGET, else 25% of RAM
    with SpillCache(budget, "prefix") as cache:
        cache.put(key, {"hidden": h, "calls": [...]})  # nested dicts / lists / tuples of tensors
        value = cache.get(key)                        # the same tensors (in RAM or mapped)
    # leaving the block (also on an exception) deletes the spill folder

A budget is bytes ("4GB", "512MiB", 4e9) or a share of physical RAM ("25%");
`parse_budget` reads both and names the option in its one-line error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import SteerdiffError

ENV_VAR = "STEERDIFF_MEMORY_BUDGET"
DEFAULT_BUDGET = "25%"  # of physical RAM, per cache
UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*|%)\s*$", re.IGNORECASE)


class BudgetError(SteerdiffError, ValueError):
    """A memory budget that cannot be read; the message names the option and the fix."""


def physical_memory_bytes() -> int:
    """This machine's physical RAM in bytes (os.sysconf)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_budget(value: str | float, option: str = "cache_budget") -> int:
    """'4GB' / '512MiB' / '25%' / 4e9 -> bytes (GB = 10^9, GiB = 2^30; '%' of physical RAM)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value >= 0:
            return int(value)
    else:
        m = _SIZE.match(str(value))
        unit = m.group(2).lower() if m else ""
        if m and unit == "%" and float(m.group(1)) <= 100:
            return int(float(m.group(1)) / 100 * physical_memory_bytes())
        if m and unit in UNITS:
            return int(float(m.group(1)) * UNITS[unit])
    raise BudgetError(
        f"{option}: cannot read {value!r} as a memory budget; give a size such as '4GB', "
        f"'512MiB' or a share of RAM such as '25%' (the {ENV_VAR} environment variable "
        "takes the same forms)."
    )


def memory_budget_bytes(value: str | float | None = None, option: str = "cache_budget") -> int:
    """The budget in bytes: `value` if given, else $STEERDIFF_MEMORY_BUDGET, else 25% of RAM."""
    if value is not None:
        return parse_budget(value, option)
    env = os.environ.get(ENV_VAR)
    if env:
        return parse_budget(env, ENV_VAR)
    return parse_budget(DEFAULT_BUDGET, option)


def format_bytes(n: float) -> str:
    """1_234_567_890 -> '1.2 GB' (decimal units, as disks and `free -h --si` count)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- sizes


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor inside nested dicts / lists / tuples."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    return []


def nbytes(value: Any) -> int:
    """Bytes held by the tensors in `value`, each storage counted once (a mask that every
    layer's call shares is one tensor, not one per layer)."""
    seen: dict[int, int] = {}
    for t in tensors_in(value):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def estimate_prefix_bytes(
    config: Any,
    n_rows: int,
    seq_len: int,
    dtype: torch.dtype = torch.float32,
    start: int = 0,
    batch_size: int | None = None,
) -> int:
    """Bytes of the prefix cache (`steerdiff.replay.compute_prefix`, from block `start`) of
    n_rows rows padded to seq_len tokens, in batches of batch_size rows (default: one batch).

    Per batch of b rows: the hidden states [b, s, d_model] in the model's dtype, one
    attention mask [b, 1, s, s] per kind of layer from `start` on (bool; the model's dtype
    for eager attention; a batch without padding may have none, so this is an upper
    bound), the rotary cos and sin [1, s, rotary_dim] per kind, and position ids [1, s].
    """
    b = batch_size or n_rows
    elt = torch.empty(0, dtype=dtype).element_size()
    d = config.hidden_size
    kinds = len(set((getattr(config, "layer_types", None) or ["one"])[start:])) or 1
    mask_elt = elt if getattr(config, "_attn_implementation", "sdpa") == "eager" else 1
    rotary = 0
    if any(hasattr(config, a) for a in ("rope_theta", "rope_parameters", "rope_scaling")):
        head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
        rot_dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
        rope_kinds = kinds if config.model_type.startswith("gemma3") else 1
        rotary = rope_kinds * 2 * seq_len * rot_dim * elt
    n_batches, last = divmod(n_rows, b)
    per_row = seq_len * d * elt + kinds * seq_len * seq_len * mask_elt
    per_batch = rotary + seq_len * 8
    return n_rows * per_row + (n_batches + (last > 0)) * per_batch


# ----------------------------------------------------------------------------- the cache


class SpillCache:
    """key -> nested tensors, in RAM up to `budget` bytes, the rest in a temporary folder
    read back memory-mapped (torch.load(mmap=True)). `close()` (or leaving a `with` block,
    or the cache being collected) deletes the folder. folder: where the temporary folder
    goes (default: the system's temporary directory, $TMPDIR)."""

    def __init__(self, budget: int, name: str = "cache", folder: str | os.PathLike | None = None):
        self.budget, self.name, self.parent = budget, name, folder
        self.in_memory: dict[Any, Any] = {}
        self.on_disk: dict[Any, Path] = {}
        self.bytes_in_memory = self.bytes_on_disk = 0
        self.folder: Path | None = None
        self._remove = None

    def __contains__(self, key: Any) -> bool:
        return key in self.in_memory or key in self.on_disk

    def __len__(self) -> int:
        return len(self.in_memory) + len(self.on_disk)

    def spill_folder(self) -> Path:
        """The temporary folder (made on first use)."""
        if self.folder is None:
            parent = self.parent if self.parent is not None else tempfile.gettempdir()
            Path(parent).mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix=f"steerdiff-{self.name}-", dir=parent))
            self._remove = weakref.finalize(self, shutil.rmtree, self.folder, True)
        return self.folder

    def put(self, key: Any, value: Any) -> None:
        """Keep `value` (nested dicts / lists / tuples of tensors, ints, floats, bools,
        None): in RAM while it fits the budget, else written to the spill folder."""
        size = nbytes(value)
        if self.bytes_in_memory + size <= self.budget:
            self.in_memory[key] = value
            self.bytes_in_memory += size
            return
        path = self.spill_folder() / f"{len(self.on_disk)}.pt"
        torch.save(value, path)
        self.on_disk[key] = path
        self.bytes_on_disk += size

    def get(self, key: Any) -> Any:
        """The value put under `key` (KeyError if none); spilled tensors are memory-mapped."""
        if key in self.in_memory:
            return self.in_memory[key]
        return torch.load(self.on_disk[key], mmap=True, weights_only=True)

    def close(self) -> None:
        """Forget every entry and delete the spill folder."""
        self.in_memory.clear()
        self.on_disk.clear()
        self.bytes_in_memory = self.bytes_on_disk = 0
        if self._remove is not None:
            self._remove()
        self.folder = self._remove = None

    def __enter__(self) -> SpillCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def disk_free_bytes(folder: str | os.PathLike | None = None) -> int:
    """Free bytes where a SpillCache with this `folder` would write."""
    return shutil.disk_usage(folder if folder is not None else tempfile.gettempdir()).free


# ----------------------------------------------------------------------------- the allocator

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # where glibc's own sliding threshold ends up


@contextmanager
def freed_memory_returns(threshold: int = 128 * 2**10) -> Iterator[None]:
    """While inside, glibc serves blocks of `threshold` bytes and more by mmap, so memory a
    step frees goes back to the operating system at once instead of staying in a
    fragmented heap (a training step's activations: 3.5 GB resident instead of 1.9 GB for
    the demo's fit). The price: fresh pages fault in (about a fifth more CPU time in such a
    step). Free heap pages are returned on entering and on leaving (malloc_trim); after
    leaving, big blocks come from the heap again. Does nothing where the C library is not
    glibc."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.malloc_trim(0)  # what earlier stages freed, before mmap stops reusing the heap
    libc.mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None
