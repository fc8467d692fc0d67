"""What a fit trains: a Student holds the trainable parameters and computes its losses.

    student(x) = base model + trainable vectors added at the chosen hook points (all positions)

Speed: when every trainable hook is at or after layer L, the activations below L do
not depend on the vectors. VectorStudent runs layers 0..L-1 once without gradients,
keeps blocks.{L}.hook_resid_pre (and the exact arguments the HF model passes to each
later decoder layer: causal masks, rotary cos/sin, position ids; see steerdiff.replay),
and each step runs only blocks L.. with gradients. For a fixed dataset the cache is
kept across epochs, within its memory budget; and a step whose activations would outgrow
the model recomputes some blocks in its backward pass (fit.memory: the plans).
(fit.baselines.ModuleStudent trains a whole module instead.)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from ..budget import SpillCache, memory_budget_bytes
from ..hooks import get_hook_point, record, steer
from ..replay import Prefix, compute_prefix, full_hidden, prefix_hidden
from .config import FitConfig
from .data import Batch, Example, collate
from .losses import token_losses
from .memory import CachePlan, CacheUse, RecomputePlan, plan_prefix_cache, plan_recompute
from .online import Target, online_losses
from .whitened import WhitenedNorms


class Student:
    """What is trained: parameters, how to compute its losses on a batch, how to be it."""

    params: dict[str, torch.Tensor]
    model: nn.Module  # what a validation batch is moved to

    def losses(
        self, batch: Batch, key: Any, objective: str, target: Target | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (CE, KL) sums [b]; key names the batch (for caches), None = no caching.
        objective "online": KL to `target` (the teacher's log-probs, fit.online)."""
        raise NotImplementedError

    def penalty(self) -> torch.Tensor | None:
        """A term added to each step's loss (e.g. fit.latent's L1 on a sparse code), with its
        graph back to the parameters; None: none (the loop logs it as "penalty")."""
        return None

    def constrain(self) -> None:
        """After every optimizer step: project the parameters onto their allowed set (e.g.
        fit.whitened's Mahalanobis-norm cap); default none."""

    def activation_scales(self, rows: Sequence[Example], pad_id: int) -> dict[str, float] | None:
        """Per trained tensor, the scale its learning rate is in units of (lr_units
        "activation"); None: absolute units (module students: weights have no such scale)."""
        return None

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        raise NotImplementedError
        yield

    def plan_memory(self, use: CacheUse, cfg: FitConfig, say: bool = True) -> None:
        """Decide what to cache and recompute for a fit that reads batches as `use` says
        (the loop calls it before the first step; say: print the plan on stderr)."""

    def release_cache(self) -> None:
        pass


class VectorStudent(Student):
    """Base model + trainable vectors at hook points (weights frozen)."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], cfg: FitConfig):
        self.model = model
        self.params = params
        layers = {n: get_hook_point(model, n).layer for n in params}
        self.by_layer: dict[int, dict[str, torch.Tensor]] = {}
        for name, layer in layers.items():
            self.by_layer.setdefault(layer, {})[name] = params[name]
        self.start = min(layers.values()) if cfg.cache_prefix else None
        self.keep: tuple[str, ...] = ("train", "val") if cfg.cache_across_epochs else ()
        self.cache = SpillCache(memory_budget_bytes(cfg.cache_budget), "prefix")
        self.plan: CachePlan | None = None
        self.recompute: RecomputePlan | None = None
        self.whitened: WhitenedNorms | None = None  # fit.whitened: penalty and cap, if any

    def penalty(self) -> torch.Tensor | None:
        """whiten_penalty x sum ||v||_M^2 when the fit is whitened (fit.whitened), else None."""
        return None if self.whitened is None else self.whitened.penalty(self.params)

    def constrain(self) -> None:
        if self.whitened is not None:
            self.whitened.constrain(self.params)

    def plan_memory(self, use: CacheUse, cfg: FitConfig, say: bool = True) -> None:
        if self.start is None:
            return
        dtype = next(self.model.parameters()).dtype
        self.plan = plan_prefix_cache(self.model.config, dtype, self.start, use, cfg)
        self.keep = self.plan.keep if self.plan.mode in ("memory", "spill") else ()
        if self.plan.mode == "spill":
            folder = self.cache.spill_folder()
            self.plan.message += f" in {folder} (deleted after the fit)"
        self.recompute = plan_recompute(self.model, self.start, self.steer_block, use)
        if say:
            print(self.plan.message, file=sys.stderr, flush=True)
            print(self.recompute.message, file=sys.stderr, flush=True)

    def steer_block(self, layer: int) -> AbstractContextManager:
        """Steering by the vectors of block `layer` only (around its replayed call)."""
        return steer(self.model, self.by_layer.get(layer, {}))

    def prefix(self, batch: Batch, key: Any) -> Prefix:
        assert self.start is not None
        if key is not None and key in self.cache:
            return Prefix.from_state(self.cache.get(key))
        p = compute_prefix(self.model, batch.input_ids, batch.attention_mask, self.start)
        part = "val" if isinstance(key, tuple) and key[0] == "val" else "train"
        if key is not None and part in self.keep:
            self.cache.put(key, p.state())
        return p

    def losses(
        self, batch: Batch, key: Any, objective: str, target: Target | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.start is None:
            with steer(self.model, self.params):
                hidden = full_hidden(self.model, batch.input_ids, batch.attention_mask)
        elif self.recompute and self.recompute.blocks and torch.is_grad_enabled():
            # each block steered by its own vectors, also when its backward pass reruns it
            p = self.prefix(batch, key)
            hidden = prefix_hidden(self.model, p, self.steer_block, self.recompute.blocks)
        else:
            with steer(self.model, self.params):
                hidden = prefix_hidden(self.model, self.prefix(batch, key))  # [b, s, d]
        if objective == "online":
            assert target is not None, "objective 'online' needs the teacher's target"
            return online_losses(self.model, hidden, batch, target)
        return token_losses(self.model, hidden, batch, objective)

    @torch.no_grad()
    def activation_scales(self, rows: Sequence[Example], pad_id: int) -> dict[str, float]:
        """Each hook's activation RMS per coordinate, s = mean_t |a_t| / sqrt(dim), over the
        real tokens of `rows` under the base model (no steering), the first token of each
        row left out (its norm is often many times the others': an attention sink)."""
        batch = collate(list(rows), pad_id).to(next(self.model.parameters()).device)
        with record(self.model, list(self.params)) as rec:
            full_hidden(self.model, batch.input_ids, batch.attention_mask)
        real = batch.attention_mask.bool().clone()
        real[:, 0] = False
        if not bool(real.any()):
            real = batch.attention_mask.bool()
        out = {}
        for name in self.params:
            a = rec[name].float()  # [b, s, dim]
            out[name] = float(a[real].norm(dim=-1).mean()) / math.sqrt(a.shape[-1])
        return out

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        with steer(self.model, {k: v.detach() for k, v in self.params.items()}):
            yield self.model

    def release_cache(self) -> None:
        self.cache.close()


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
