"""What a fit trains: a Student holds the trainable parameters and computes its losses.

    student(x) = base model + trainable vectors added at the chosen hook points (all positions)

Speed: when every trainable hook is at or after layer L, the activations below L do
not depend on the vectors. VectorStudent runs layers 0..L-1 once without gradients,
keeps blocks.{L}.hook_resid_pre (and the exact arguments the HF model passes to each
later decoder layer: causal masks, rotary cos/sin, position ids; see steerdiff.replay),
and each step runs only blocks L.. with gradients. For a fixed dataset the cache is
kept across epochs. (fit.baselines.ModuleStudent trains a whole module instead.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..hooks import get_hook_point, steer
from ..replay import Prefix, compute_prefix, full_hidden, prefix_hidden
from .config import FitConfig
from .data import Batch
from .losses import token_losses


class Student:
    """What is trained: parameters, how to compute its losses on a batch, how to be it."""

    params: dict[str, torch.Tensor]
    model: nn.Module  # what a validation batch is moved to

    def losses(self, batch: Batch, key: Any, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (CE, KL) sums [b]; key names the batch (for caches), None = no caching."""
        raise NotImplementedError

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        raise NotImplementedError
        yield

    def release_cache(self) -> None:
        pass


class VectorStudent(Student):
    """Base model + trainable vectors at hook points (weights frozen)."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], cfg: FitConfig):
        self.model = model
        self.params = params
        layers = [get_hook_point(model, n).layer for n in params]
        self.start = min(layers) if cfg.cache_prefix else None
        self.keep_cache = cfg.cache_across_epochs
        self.cache: dict[Any, Prefix] = {}

    def prefix(self, batch: Batch, key: Any) -> Prefix:
        assert self.start is not None
        if key is not None and key in self.cache:
            return self.cache[key]
        p = compute_prefix(self.model, batch.input_ids, batch.attention_mask, self.start)
        if key is not None and self.keep_cache:
            self.cache[key] = p
        return p

    def losses(self, batch: Batch, key: Any, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
        with steer(self.model, self.params):
            if self.start is None:
                hidden = full_hidden(self.model, batch.input_ids, batch.attention_mask)
            else:
                hidden = prefix_hidden(self.model, self.prefix(batch, key))  # [b, s, d]
            return token_losses(self.model, hidden, batch, objective)

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        with steer(self.model, {k: v.detach() for k, v in self.params.items()}):
            yield self.model

    def release_cache(self) -> None:
        self.cache.clear()


def init_vectors(model: nn.Module, names: list[str], cfg: FitConfig) -> dict[str, torch.Tensor]:
    """Zero or seeded-random (std cfg.init_scale) vectors, one per hook, requires_grad.

    Kept in float32 whatever the model's dtype (steer casts them at the hook).
    """
    g = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    out = {}
    for name in names:
        dim = get_hook_point(model, name).dim
        v = (
            torch.zeros(dim)
            if cfg.init == "zero"
            else cfg.init_scale * torch.randn(dim, generator=g)
        )
        out[name] = v.to(device=device, dtype=torch.float32).requires_grad_(True)
    return out
