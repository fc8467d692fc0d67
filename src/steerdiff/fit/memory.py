"""What a vector fit holds in memory beyond the model, and the plan that bounds it.

Two things grow with the data and the batch:

- the prefix cache: blocks.{L}.hook_resid_pre (and each later block's call arguments) of
  every batch, kept so that later epochs skip layers 0..L-1. `plan_prefix_cache` keeps
  only what is read more than once, in RAM within cfg.cache_budget, else spilled to a
  memory-mapped temporary file (steerdiff.budget.SpillCache), else (no disk space)
  recomputed for every batch.
- the activations one step keeps for its backward pass: every replayed block's
  internals, for every token of the micro-batch (3.2 GB for the demo's 16 rows x 160
  tokens x 30 blocks of a 135M model in float32). `plan_recompute` bounds them by the
  model's own weights: the blocks beyond that are recomputed in the backward pass (activation checkpointing: the same gradients, bit for bit, for an extra
  forward of those blocks).

Both plans print one line when the fit starts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..budget import (
    SpillCache,
    disk_free_bytes,
    estimate_prefix_bytes,
    format_bytes,
    memory_budget_bytes,
    tensors_in,
)
from ..hooks import get_blocks
from ..replay import call_block, compute_prefix
from .config import FitConfig
from .data import Example


@dataclass
class CacheUse:
    """How a fit reads its micro-batches: their shapes [(rows, tokens)] and how many times
    each is read (train: epochs touched; val: evaluations)."""

    train_shapes: list[tuple[int, int]]
    train_reads: int
    val_shapes: list[tuple[int, int]]
    val_reads: int


@dataclass
class CachePlan:
    """What the prefix cache keeps ('train', 'val') and where: 'memory', 'spill' (beyond
    the budget, to a memory-mapped temporary file), 'recompute' (too big for the disk
    too: each batch runs the layers below the hooks again) or 'none' (nothing is read
    twice)."""

    keep: tuple[str, ...]
    mode: str
    need: int  # bytes of what `keep` would hold
    budget: int
    message: str


def plan_prefix_cache(
    config: Any, dtype: torch.dtype, start: int, use: CacheUse, cfg: FitConfig
) -> CachePlan:
    """What the fit's prefix cache (from block `start` of a model with this HF config and
    dtype) would need, against cfg.cache_budget, and the choice: keep only what is read
    more than once; in RAM within the budget, else spilled to a memory-mapped file (reading
    it back costs far less than recomputing `start` layers), else, without the disk space,
    recomputed for every batch."""
    budget = memory_budget_bytes(cfg.cache_budget)
    parts = {"train": (use.train_shapes, use.train_reads), "val": (use.val_shapes, use.val_reads)}
    keep = tuple(k for k, (shapes, reads) in parts.items() if reads > 1 and shapes)
    if not cfg.cache_across_epochs or not keep:
        why = (
            "caching across epochs is off"
            if not cfg.cache_across_epochs
            else "no batch is read twice"
        )
        return CachePlan((), "none", 0, budget, f"prefix cache: none ({why})")
    shapes = [sh for k in keep for sh in parts[k][0]]
    total = sum(estimate_prefix_bytes(config, b, s, dtype, start) for b, s in shapes)
    elt = torch.empty(0, dtype=dtype).element_size()
    what = (
        f"prefix cache (blocks.{start}.hook_resid_pre): {sum(b for b, _ in shapes):,} rows "
        f"x up to {max(s for _, s in shapes)} tokens x {config.hidden_size} x {elt} bytes "
        f"+ masks = {format_bytes(total)}"
    )
    if total <= budget:
        msg = f"{what} <= budget {format_bytes(budget)}: in memory"
        return CachePlan(keep, "memory", total, budget, msg)
    over = f"{what} > budget {format_bytes(budget)} (cache_budget)"
    if disk_free_bytes() > (total - budget) * 1.1:
        spill = f"{over}: spilling {format_bytes(total - budget)} to a memory-mapped temporary file"
        return CachePlan(keep, "spill", total, budget, spill)
    return CachePlan(
        keep,
        "recompute",
        total,
        budget,
        f"{over}, and the temporary directory ($TMPDIR) has less free space: recomputing "
        f"the layers below block {start} for every batch",
    )


# ----------------------------------------------------------------------------- activations


@dataclass
class RecomputePlan:
    """Which replayed blocks a training step recomputes in its backward pass."""

    blocks: frozenset[int]
    need: int  # bytes one step would keep for its backward pass without recomputing
    budget: int
    message: str


def saved_bytes_per_token(
    model: nn.Module,
    block: int,
    around: Callable[[int], AbstractContextManager],
    seq_len: int,
) -> float:
    """Bytes autograd keeps for the backward pass of decoder block `block` (its vectors
    steered in by `around`), per token: measured on two rows of seq_len tokens, one padded
    as in a fit's batch (weights, which it keeps by reference, and the recorded call
    arguments not counted)."""
    dev = next(model.parameters()).device
    ids = torch.zeros(2, seq_len, dtype=torch.long, device=dev)
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    prefix = compute_prefix(model, ids, mask, block)
    shared = {
        t.untyped_storage().data_ptr()
        for t in itertools.chain(model.parameters(), model.buffers(), tensors_in(prefix.calls))
    }
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in shared:
            saved[s.data_ptr()] = s.nbytes()
        return t

    h = prefix.hidden.detach().requires_grad_(True)  # as in a block after the first vector
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call_block(get_blocks(model)[block], block, h, prefix.calls[0], around=around)
    return sum(saved.values()) / (2 * seq_len)


def activation_budget(model: nn.Module) -> int:
    """Bytes of activations a training step may keep for its backward pass: as many as
    the model's weights take (a fit then needs about twice the model, whatever the batch)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def plan_recompute(
    model: nn.Module,
    start: int,
    around: Callable[[int], AbstractContextManager],
    use: CacheUse,
) -> RecomputePlan:
    """Blocks start.. keep their activations for the backward pass up to
    `activation_budget(model)`; the rest (the first ones) are recomputed in it."""
    n = len(get_blocks(model))
    budget = activation_budget(model)
    rows, tokens = max(use.train_shapes, key=lambda bs: bs[0] * bs[1])
    per_block = rows * tokens * saved_bytes_per_token(model, start, around, tokens)
    need = int(per_block * (n - start))
    what = (
        f"activations for the backward pass: up to {rows} rows x {tokens} tokens x "
        f"{n - start} blocks = {format_bytes(need)}"
    )
    if need <= budget:
        return RecomputePlan(frozenset(), need, budget, f"{what}, kept")
    keep = min(n - start, math.floor(budget / per_block)) if per_block else n - start
    recompute = frozenset(range(start, n - keep))
    return RecomputePlan(
        recompute,
        need,
        budget,
        f"{what} > {format_bytes(budget)} (the model's weights): recomputing "
        f"{len(recompute)} of {n - start} blocks in the backward pass (the same gradients, "
        "an extra forward of those blocks)",
    )


# ----------------------------------------------------------------------------- top-k


def pack_topk(examples: list[Example], budget: int) -> str | None:
    """The teacher's top-k ids and log-probs of `examples` as slices of two arrays instead
    of Python lists (a list of k Python floats takes about 30 bytes a value, the array 4):
    in RAM within `budget` bytes, else in a memory-mapped temporary file (deleted at once:
    the mapping keeps its pages until the examples go). The values are the float32 numbers
    `collate` makes of the lists, so the losses do not change. In place: each Example's
    topk_ids / topk_logprobs become [n, k] tensor slices. Returns the line to print (None
    when no example has top-k lists, or their k differ)."""
    todo = [ex for ex in examples if isinstance(ex.topk_ids, list)]
    if not todo:
        return None
    ks = {len(row) for ex in todo for row in ex.topk_ids}  # type: ignore[union-attr]
    if len(ks) != 1:
        return None  # rows with different k stay lists
    n, k = sum(len(ex.topk_ids) for ex in todo), ks.pop()  # type: ignore[arg-type]
    need = n * k * (8 + 4)
    what = f"top-k log-probs: {n:,} tokens x {k} = {format_bytes(need)}"
    if need <= budget:
        ids, lps = torch.empty(n, k, dtype=torch.long), torch.empty(n, k, dtype=torch.float32)
        where = f"{what} <= budget {format_bytes(budget)}: in memory"
    else:
        with SpillCache(0, "topk") as spill:  # its folder is deleted on leaving: the
            # mappings keep the pages, and nothing is left on disk after the fit
            ids = mapped(spill.spill_folder() / "ids", (n, k), torch.long)
            lps = mapped(spill.spill_folder() / "logprobs", (n, k), torch.float32)
        where = f"{what} > budget {format_bytes(budget)} (cache_budget): memory-mapped"
    at = 0
    for ex in todo:
        m = len(ex.topk_ids)  # type: ignore[arg-type]
        ids[at : at + m] = torch.tensor(ex.topk_ids, dtype=torch.long)
        lps[at : at + m] = torch.tensor(ex.topk_logprobs, dtype=torch.float32)
        ex.topk_ids, ex.topk_logprobs = ids[at : at + m], lps[at : at + m]  # type: ignore[assignment]
        at += m
    return where


def mapped(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled tensor backed by a new file at `path`, shared-mapped (deleting the
    file leaves the mapping: its pages stay until the tensor and its views are freed)."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    storage = torch.UntypedStorage.from_file(str(path), shared=True, nbytes=nbytes)
    return (
        torch.empty(0, dtype=dtype).set_(storage).view(shape)
        if nbytes
        else torch.empty(shape, dtype=dtype)
    )
