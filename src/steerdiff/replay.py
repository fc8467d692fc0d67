"""The one prefix engine: record how a Hugging Face model calls its decoder blocks, then
replay blocks L.. from there (with vectors added, with gradients, many times).

Every stage of steerdiff is forward-pass bound, and most of them change the model only
from some layer L on (a vector at blocks.{L}..., a fit whose lowest hook is at L). The
blocks below L then compute the same activations on every pass, so we run them once.

One recording mechanism: while `recording(model, start)` is active, decoder blocks
start.. are stood in for by recorders that note each call (the block's input and the
keyword arguments the HF forward built for it: causal / sliding-window masks, rotary
cos/sin, position ids) and then run the block, or, for a prefix, run nothing. One replay
loop: `replay_blocks(model, prefix)` calls the real blocks again with those arguments.
Because the HF forward itself built them, replays match a full forward exactly
(tests/test_replay.py checks every supported family). The uses:

    # the fit: run layers 0..L-1 once per batch, then blocks L.. with the trained vectors
    prefix = compute_prefix(model, input_ids, attention_mask, start=L)
    with steer(model, vectors):
        logits = lm_head(model, prefix_hidden(model, prefix))  # [b, s, vocab]

    # the sweep: record an unsteered pass once (a KV cache that keeps every position),
    # keeping each block's output; a vector at blocks.{L}.hook_resid_post then changes
    # only blocks L+1.., which replay with their own KV cache
    rec = record_forward(model, keep_outputs=True, input_ids=ids, past_key_values=DynamicCache())
    h = replay_blocks(model, rec, rec.output(L) + coeff * v, first=L + 1, cache=ReplayCache())

    # the lens: record a real forward from `start`, replay it under steering
    with recording(model, start) as prefix:
        h0 = full_hidden(model, input_ids, attention_mask)  # [b, s, d], final-normed
    with steer(model, vectors):
        h1 = prefix_hidden(model, prefix)

    # activations at some hooks, the pass stopping after the last block they need
    # (SAE training, whitening): hook_activations(model, hooks, input_ids) -> {hook: [n, d]}

Enter `steer(...)` / `record(...)` before `recording(...)`, not inside it: they find
blocks by their place in the model, where a recorder stands while recording.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Container, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import SteerdiffError
from .hooks import final_norm, get_blocks, get_hook_point, record
from .models import LoadedModel, unwrap


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
    """Final-normed hidden states [b, s, d] from a normal forward of the HF base model
    (the decoder stack without the LM head; a PEFT model's adapters stay active)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = base.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


# ----------------------------------------------------------------------------- recording


@dataclass
class Prefix:
    """One recorded forward pass, from block `start` on: what a replay needs."""

    start: int
    hidden: torch.Tensor | None = None  # [b, s, d] blocks.{start}.hook_resid_pre
    calls: list[dict[str, Any]] = field(default_factory=list)  # blocks start..n-1: kwargs
    outputs: list[torch.Tensor] = field(default_factory=list)  # blocks start..n-1: [b, s, d]

    def output(self, layer: int) -> torch.Tensor:
        """blocks.{layer}.hook_resid_post of the recorded pass [b, s, d] (keep_outputs=True)."""
        return self.outputs[layer - self.start]

    def state(self) -> dict[str, Any]:
        """The recording as plain containers of tensors (what budget.SpillCache stores; the
        tensors that every block's call shares, masks and rotary cos/sin, stay shared)."""
        return {
            "start": self.start,
            "hidden": self.hidden,
            "calls": self.calls,
            "outputs": self.outputs,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Prefix:
        """The Prefix whose `state()` this is."""
        return cls(state["start"], state["hidden"], list(state["calls"]), list(state["outputs"]))


class _Stop(SteerdiffError):
    """Ends a prefix pass after the last block's call is recorded (caught inside `recording`;
    it never reaches a caller)."""


class _Recorder(nn.Module):
    """Stands in for decoder block j while recording: notes the call, then runs the block
    (or, for a prefix, returns its input unchanged and stops the pass at the last block)."""

    def __init__(self, block: nn.Module, prefix: Prefix, run: bool, keep: bool, last: bool):
        super().__init__()
        self.block = block
        self.prefix, self.run, self.keep, self.last = prefix, run, keep, last
        self.signature = inspect.signature(block.forward)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden, call = _keywords(self.signature, args, kwargs)
        if not self.prefix.calls:
            self.prefix.hidden = hidden.detach()
        self.prefix.calls.append(call)
        if not self.run:
            if self.last:
                raise _Stop
            return hidden
        out = self.block(*args, **kwargs)
        if self.keep:
            self.prefix.outputs.append(out[0] if isinstance(out, tuple) else out)
        return out


def _keywords(sig: inspect.Signature, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """A block call as (hidden_states, every other argument by name), without the KV cache:
    GPT-2 passes its cache and mask by position, the other families by name."""
    bound = sig.bind(*args, **kwargs).arguments
    call: dict[str, Any] = {}
    for name, value in bound.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        else:
            call[name] = value
    call.pop("past_key_values", None)  # a replay brings its own cache (or none)
    return call.pop("hidden_states"), call


@contextmanager
def recording(
    model: nn.Module, start: int = 0, run_blocks: bool = True, keep_outputs: bool = False
) -> Iterator[Prefix]:
    """Record the calls of decoder blocks start.. during the forward pass run inside.

    run_blocks=False: blocks start.. do not run (a prefix pass; the forward stops after the
    last block's call is recorded, silently). keep_outputs: keep each block's output
    (hook_resid_post) too. Hooks on blocks start.. still fire when the blocks run, but
    the recorded inputs are the ones the model passed, before the blocks' own hooks.
    """
    blocks = get_blocks(model)
    n = len(blocks)
    prefix = Prefix(start)
    originals = [blocks[j] for j in range(start, n)]
    try:
        for j, block in zip(range(start, n), originals, strict=True):
            blocks[j] = _Recorder(block, prefix, run_blocks, keep_outputs, last=j == n - 1)
        yield prefix
    except _Stop:
        pass
    finally:
        for j, block in zip(range(start, n), originals, strict=True):
            blocks[j] = block


def record_forward(
    model: nn.Module, start: int = 0, keep_outputs: bool = False, **forward_kwargs: Any
) -> Prefix:
    """Run model(**forward_kwargs) once and record blocks start.. (the blocks run)."""
    with recording(model, start, keep_outputs=keep_outputs) as prefix:
        model(**forward_kwargs)
    return prefix


@torch.no_grad()
def compute_prefix(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    start: int,
) -> Prefix:
    """Run layers 0..start-1 once (no grad); record how the HF model calls layers start..

    Blocks >= start do not run (nor do their hooks): the HF forward itself builds the
    causal masks / sliding-window masks / rotary embeddings per layer exactly as it
    would, and prefix_hidden replays them.
    """
    with recording(model, start, run_blocks=False) as prefix:
        model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return prefix


def last_layer(model: nn.Module, hooks: list[str]) -> int:
    """The highest block any of `hooks` reads."""
    return max(get_hook_point(model, h).layer for h in hooks)


@torch.no_grad()
def hook_activations(
    model: nn.Module | LoadedModel,
    hooks: list[str],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    skip_first: int = 1,
) -> dict[str, torch.Tensor]:
    """{hook: [n_tokens, d] float32} from ONE forward pass that stops after the last block
    needed; positions < skip_first of each row and padding (attention_mask 0) left out."""
    model = unwrap(model)
    stop = last_layer(model, hooks) + 1
    with record(model, hooks) as rec:
        compute_prefix(model, input_ids, attention_mask, start=stop)
    keep = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    keep[:, :skip_first] = False
    if attention_mask is not None:
        keep &= attention_mask.bool()
    return {h: rec[h][keep.to(rec[h].device)].float().cpu() for h in hooks}


# ----------------------------------------------------------------------------- replaying


class ReplayCache:
    """A KV cache for replayed blocks only (HF attention only calls update()).

    A replay from block L never runs blocks <= L, so it never reads their entries; the
    recorded masks and positions already account for the cached tokens."""

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.kv = dict(kv or {})  # layer -> keys, values [b, kv_heads, pos, head_dim]

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *_args, **_kwargs):
        old = self.kv.get(layer_idx)
        if old is not None:
            k, v = torch.cat([old[0], k], dim=-2), torch.cat([old[1], v], dim=-2)
        self.kv[layer_idx] = (k, v)
        return k, v

    def rows(self, idx: torch.Tensor | int) -> ReplayCache:
        """Row selection (a tensor of row indices) or expansion of a 1-row cache (an int)."""
        if isinstance(idx, int):
            return ReplayCache(
                {
                    j: (k.expand(idx, -1, -1, -1), v.expand(idx, -1, -1, -1))
                    for j, (k, v) in self.kv.items()
                }
            )
        return ReplayCache({j: (k[idx], v[idx]) for j, (k, v) in self.kv.items()})


def replay_blocks(
    model: nn.Module,
    prefix: Prefix,
    hidden: torch.Tensor | None = None,
    first: int | None = None,
    cache: ReplayCache | None = None,
    around: Callable[[int], AbstractContextManager] | None = None,
    recompute: Container[int] = (),
) -> torch.Tensor:
    """Run blocks first.. (default: prefix.start) with their recorded calls, from `hidden`
    (default: the recorded input of block start) -> the last block's output [b, s, d],
    before the final norm. Hooks (steer, record) on those blocks fire as usual.

    around(j): a context entered around block j's call (e.g. `steer` with block j's
    vectors), also when the backward pass recomputes it. recompute: blocks whose
    activations are not kept for the backward pass but computed again in it (activation
    checkpointing: the same gradients for far less memory; only while grad is enabled).
    """
    first = prefix.start if first is None else first
    h = prefix.hidden if hidden is None else hidden
    blocks = get_blocks(model)
    for j in range(first, len(blocks)):
        call = prefix.calls[j - prefix.start]
        if j in recompute and torch.is_grad_enabled():
            h = checkpoint(call_block, blocks[j], j, h, call, cache, around, use_reentrant=False)
        else:
            h = call_block(blocks[j], j, h, call, cache, around)
    return h


def call_block(
    block: nn.Module,
    j: int,
    h: torch.Tensor,
    call: dict[str, Any],
    cache: ReplayCache | None = None,
    around: Callable[[int], AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Block j's output [b, s, d] for input h with its recorded call (inside around(j))."""
    with around(j) if around is not None else nullcontext():
        out = block(h, **call, past_key_values=cache)
    return out[0] if isinstance(out, tuple) else out


def prefix_hidden(
    model: nn.Module,
    prefix: Prefix,
    around: Callable[[int], AbstractContextManager] | None = None,
    recompute: Container[int] = (),
) -> torch.Tensor:
    """Run blocks start.. from the cached resid_pre (with grad) -> final-normed hidden
    [b, s, d] (around, recompute: as in replay_blocks)."""
    return final_norm(model)(replay_blocks(model, prefix, around=around, recompute=recompute))
