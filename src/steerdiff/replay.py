"""The one prefix engine: record how a Hugging Face model calls its decoder blocks, then
replay blocks L.. from there (with vectors added, with gradients, many times).

Every stage of steerdiff is forward-pass bound, and most of them change the model only
from some layer L on (a vector at blocks.{L}..., a fit whose lowest hook is at L). The
blocks below L then compute the same activations on every pass, so we run them once:

    prefix = compute_prefix(model, input_ids, attention_mask, start=L)  # layers 0..L-1, once
    h = prefix_hidden(model, prefix)      # layers L..n-1 (+ any steering hooks) -> final norm
    logits = lm_head(model, h)            # [..., vocab]

The recorded call arguments (causal / sliding-window masks, rotary embeddings, position
ids) are the ones the HF forward itself built, so replays match a full forward exactly
(tests/test_replay.py and the fit tests check this for every supported family).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .hooks import final_norm, get_blocks


def lm_head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden [..., d] -> logits [..., vocab] (with gemma's soft-capping)."""
    logits = model.get_output_embeddings()(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def full_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Final-normed hidden states [b, s, d] from a normal forward of the HF base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = base.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


class _Stop(Exception):
    pass


class _LayerRecorder(nn.Module):
    """Stands in for decoder layer j during the prefix pass: records its call, runs nothing."""

    def __init__(self, store: list, last: bool):
        super().__init__()
        self.store, self.last = store, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.store.append((hidden_states, args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


@dataclass
class Prefix:
    """Everything blocks L.. need: blocks.{L}.hook_resid_pre and each later layer's call args."""

    start: int
    hidden: torch.Tensor  # [b, s, d] = blocks.{start}.hook_resid_pre
    layer_calls: list[tuple[tuple, dict]]  # (args, kwargs) for layers start..n-1


@torch.no_grad()
def compute_prefix(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    start: int,
) -> Prefix:
    """Run layers 0..start-1 once (no grad); record how the HF model calls layers start...

    Layers >= start are swapped for recorders during this pass, so the HF forward itself
    builds the causal masks / sliding-window masks / rotary embeddings per layer exactly
    as it would, and we replay them.
    """
    blocks = get_blocks(model)
    n = len(blocks)
    store: list = []
    originals = [blocks[j] for j in range(start, n)]
    try:
        for j in range(start, n):
            blocks[j] = _LayerRecorder(store, last=(j == n - 1))
        with contextlib.suppress(_Stop):
            model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for j, m in zip(range(start, n), originals, strict=True):
            blocks[j] = m
    calls = [(args, kwargs) for _, args, kwargs in store]
    return Prefix(start, store[0][0].detach(), calls)


def prefix_hidden(model: nn.Module, prefix: Prefix) -> torch.Tensor:
    """Run blocks start.. from the cached resid_pre (with grad) -> final-normed hidden [b, s, d]."""
    blocks = get_blocks(model)
    h = prefix.hidden
    for j, (args, kwargs) in zip(range(prefix.start, len(blocks)), prefix.layer_calls, strict=True):
        h = blocks[j](h, *args, **kwargs)
        h = h[0] if isinstance(h, tuple) else h
    return final_norm(model)(h)
