"""Data parallel fits: launched with `accelerate launch` / torchrun, each rank takes every
world_size-th micro-batch of a step and gradients are summed with all_reduce, so the
result equals a single-process run (up to float summation order)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def maybe_init_distributed() -> tuple[int, int]:
    """Join the process group when launched by accelerate/torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    return rank_world()


def all_reduce_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over ranks in place (nothing to do in a single process)."""
    if rank_world()[1] > 1:
        for t in tensors:
            dist.all_reduce(t)
