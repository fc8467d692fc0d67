"""The `steer` / `record` context managers, and the token positions they act on.

Hook points (names such as ``blocks.5.hook_resid_post``, the architecture families,
selection by glob) are defined in `steerdiff.hookpoints` and re-exported here, so
``from steerdiff.hooks import ...`` gives the whole hook API.

Where a vector is *added*: at the named tensor itself, except `hook_resid_mid`, which
is written by adding to the attention output (the residual after attention then
carries the vector into the MLP's norm and onward, exactly as adding at the
residual would). Where a vector is *read* (`record`): at the named tensor, after
any steering of the same hook point.

Hooks are registered inside context managers and removed in ``finally``: a model
is never left steered after an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .errors import SteerdiffError
from .hookpoints import (
    FAMILIES,
    FAMILY_LABELS,
    HOOK_SUFFIXES,
    RESIDUAL_SUFFIXES,
    Family,
    HookError,
    HookPoint,
    describe,
    family_of,
    final_norm,
    get_blocks,
    get_hook_point,
    hook_dim,
    list_hook_points,
    n_layers,
    select_hooks,
)
from .models import LoadedModel, unwrap

__all__ = [
    "FAMILIES",
    "FAMILY_LABELS",
    "HOOK_SUFFIXES",
    "RESIDUAL_SUFFIXES",
    "Family",
    "HookError",
    "HookPoint",
    "NonFiniteError",
    "Op",
    "PROMPT_CONTINUES",
    "Positions",
    "Recording",
    "VectorsLike",
    "as_vector",
    "check_finite",
    "describe",
    "family_of",
    "final_norm",
    "get_blocks",
    "get_hook_point",
    "hook_dim",
    "list_hook_points",
    "n_layers",
    "parse_positions",
    "position_mask",
    "record",
    "select_hooks",
    "steer",
]

# ----------------------------------------------------------------------------- positions

Positions = str | torch.Tensor  # "all" | "prompt" | "response" | "first:k" | bool mask [batch, pos]
# True around forwards that continue the prompt after a KV cache (generate.prefix's suffixes)
PROMPT_CONTINUES: ContextVar[bool] = ContextVar("PROMPT_CONTINUES", default=False)


@dataclass
class _ForwardState:
    """What the current forward pass looks like, read by a pre-hook on the whole model."""

    past_len: int = 0  # tokens already in the KV cache
    cur_len: int = 0  # tokens in this forward
    attention_mask: torch.Tensor | None = None  # [batch, past_len + cur_len]
    prompt_len: int | None = None  # last forward with an empty cache (+ PROMPT_CONTINUES ones)


def _input_len(args: tuple, kwargs: dict) -> int | None:
    x = kwargs.get("input_ids")
    if x is None and args:
        x = args[0]
    if x is None:
        x = kwargs.get("inputs_embeds")
    return None if x is None else int(x.shape[1])


def _past_len(kwargs: dict) -> int:
    cache = kwargs.get("past_key_values")
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy tuple cache


@contextmanager
def _track_positions(model: nn.Module) -> Iterator[_ForwardState]:
    state = _ForwardState()

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        cur = _input_len(args, kwargs)
        if cur is None:
            return
        state.cur_len = cur
        state.past_len = _past_len(kwargs)
        state.attention_mask = kwargs.get("attention_mask")
        if state.past_len == 0 or PROMPT_CONTINUES.get():
            state.prompt_len = state.past_len + cur

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)
    try:
        yield state
    finally:
        handle.remove()


def parse_positions(positions: Positions) -> tuple[str, int]:
    if isinstance(positions, torch.Tensor):
        return "mask", 0
    if positions in ("all", "prompt", "response"):
        return positions, 0
    m = re.fullmatch(r"first:(\d+)", str(positions))
    if m:
        return "first", int(m.group(1))
    raise HookError(
        f"Unknown positions {positions!r}; use 'all', 'prompt', 'response', 'first:k' "
        "(e.g. 'first:5'), or a bool mask tensor of shape [batch, pos]."
    )


def position_mask(
    positions: Positions, state: _ForwardState, batch: int, seq: int, device: torch.device
) -> torch.Tensor | None:
    """Bool mask [batch, seq] of the token positions to act on in this forward (None = all)."""
    kind, k = parse_positions(positions)
    if kind == "all":
        return None
    if kind == "mask":
        mask = positions  # type: ignore[assignment]
        if mask.shape != (batch, seq):  # type: ignore[union-attr]
            raise HookError(
                f"positions mask has shape {tuple(mask.shape)} but this forward has "  # type: ignore[union-attr]
                f"[batch, pos] = [{batch}, {seq}]; a mask only fits full (teacher-forced) passes."
            )
        return mask.to(device=device, dtype=torch.bool)  # type: ignore[union-attr]
    abs_pos = torch.arange(state.past_len, state.past_len + seq, device=device)  # [seq]
    if kind in ("prompt", "response"):
        prompt_len = state.prompt_len if state.prompt_len is not None else seq
        m = abs_pos < prompt_len if kind == "prompt" else abs_pos >= prompt_len
        return m.unsqueeze(0).expand(batch, seq)
    # first:k counts real tokens from each row's start (left padding is skipped)
    am = state.attention_mask
    if am is not None and am.dim() == 2 and am.shape[1] >= seq:
        am = am.to(device)
        real_pos = (am.long().cumsum(dim=1) - 1)[:, -seq:]  # [batch, seq]
        return (real_pos < k) & (am[:, -seq:] > 0)
    return (abs_pos < k).unsqueeze(0).expand(batch, seq)


# ----------------------------------------------------------------------------- vectors

VectorsLike = Mapping[str, torch.Tensor]  # a VectorSet or a dict hook name -> [dim]


class NonFiniteError(SteerdiffError, ValueError):
    """A vector or coefficient holds NaN or Inf: steering with it makes every logit NaN."""


def as_vector(name: str, v: Any) -> torch.Tensor:
    """The vector for hook `name` as a tensor: a tensor is kept as it is (dtype, device,
    autograd); a numpy array or a list of numbers becomes a float32 tensor."""
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, (np.ndarray, list, tuple)):
        try:
            return torch.from_numpy(np.asarray(v, dtype=np.float32))
        except (TypeError, ValueError) as e:
            raise HookError(
                f"The vector for {name} is a {type(v).__name__} that is not a flat list of "
                f"numbers ({e}); give a torch tensor, a numpy array or a list of floats [dim]."
            ) from e
    raise HookError(
        f"The vector for {name} is a {type(v).__name__}; give a torch tensor, a numpy array "
        "or a list of floats of shape [dim]."
    )


def _all_finite(tensors: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor holds only finite values (one device sync for all of them)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors]
    dev = flags[0].device
    return torch.stack([f.to(dev) for f in flags]).tolist()


def check_finite(vectors: Mapping[str, torch.Tensor], where: str = "", coeff: Any = None) -> None:
    """Raise NonFiniteError naming the first hook whose vector holds NaN or Inf (and a
    non-finite `coeff`). `where` names the file, e.g. " in runs/a/vectors.safetensors"."""
    names = list(vectors)
    tensors = [vectors[n] for n in names]
    if isinstance(coeff, torch.Tensor):
        tensors.append(coeff)
    ok = _all_finite(tensors) if tensors else []
    for i, name in enumerate(names):
        if not ok[i]:
            v = tensors[i].detach()
            n_nan, n_inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
            raise NonFiniteError(
                f"The vector for {name}{where} holds {n_nan} NaN and {n_inf} Inf of its "
                f"{v.numel()} values: steering with it would make every logit NaN. Refit or "
                "recompute it (a fit that diverged gives NaN: lower the learning rate)."
            )
    if isinstance(coeff, torch.Tensor):
        bad, shown = not ok[-1], f"tensor {coeff.detach().flatten()[:8].tolist()}"
    else:
        bad, shown = coeff is not None and not math.isfinite(float(coeff)), str(coeff)
    if bad:
        raise NonFiniteError(
            f"coeff {shown} for steering at {', '.join(names)} is not finite (NaN or Inf): "
            "it would make every logit NaN; pass a finite number."
        )


# ----------------------------------------------------------------------------- steer / record


# a hooked module's tensor (output or first input) and how to put a new one back (sae.splice)
def get_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def replace_tensor(x: Any, new: torch.Tensor) -> Any:
    return (new, *x[1:]) if isinstance(x, tuple) else new


def input_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def with_input(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def _check_vector(model: nn.Module, hp: HookPoint, v: torch.Tensor) -> None:
    if v.dim() != 1 or v.shape[0] != hp.dim:
        raise HookError(
            f"Vector for {hp.name} has shape {tuple(v.shape)}; expected ({hp.dim},) "
            f"for this model ({model.config.model_type}, d_model={model.config.hidden_size})."
        )


Op = Literal["add", "ablate"]


def _apply(
    h: torch.Tensor, v: torch.Tensor, coeff: float | torch.Tensor, mask: torch.Tensor | None, op: Op
) -> torch.Tensor:
    """h: [batch, pos, dim]; v: [dim]; coeff: float or per-row [batch]; mask: [batch, pos] or None."""
    v = v.to(device=h.device, dtype=h.dtype)
    if isinstance(coeff, torch.Tensor):  # one coefficient per row
        if coeff.shape != (h.shape[0],):
            raise HookError(
                f"Per-row coeff has shape {tuple(coeff.shape)} but this forward has batch "
                f"{h.shape[0]}; pass a float or a tensor of shape [batch]."
            )
        coeff = coeff.to(device=h.device, dtype=h.dtype).view(-1, 1, 1)  # [batch, 1, 1]
    if op == "add":
        delta = (coeff * v).expand_as(h)  # [dim] or [batch, 1, dim] -> [batch, pos, dim]
    else:  # ablate: remove coeff times the component of h along v
        unit = v / v.norm().clamp_min(1e-12)
        delta = -coeff * (h @ unit).unsqueeze(-1) * unit  # [batch, pos, dim]
    if mask is not None:
        delta = delta * mask.unsqueeze(-1).to(h.dtype)
    return h + delta


def _act(
    hp: HookPoint,
    h: torch.Tensor,
    v: torch.Tensor,
    coeff: float | torch.Tensor,
    state,
    positions,
    op,
) -> torch.Tensor:
    mask = position_mask(positions, state, h.shape[0], h.shape[1], h.device)
    if hp.channel_slice is None:
        return _apply(h, v, coeff, mask, op)
    s = hp.channel_slice
    part = _apply(h[..., s], v, coeff, mask, op)
    return torch.cat([h[..., : s.start], part, h[..., s.stop :]], dim=-1)


@contextmanager
def steer(
    model: nn.Module | LoadedModel,
    vectors: VectorsLike,
    coeff: float | torch.Tensor = 1.0,
    positions: Positions = "all",
    op: Op = "add",
) -> Iterator[None]:
    """Add (or ablate) vectors at hook points while inside the block.

    vectors: a VectorSet or dict {hook name: tensor [dim]} (a numpy array or a list of
      floats is turned into a float32 tensor). A vector or coeff holding NaN or Inf
      raises NonFiniteError naming the hook.
    coeff: multiplies every vector (negative to subtract); a tensor [batch] gives each
      row its own coefficient (e.g. several strengths in one batched pass).
    positions: "all"; "prompt" (positions of the prefill, i.e. the input prompt);
      "response" (only tokens generated after the prompt, also under KV-cache
      generation); "first:k" (each row's first k real tokens); or a bool mask
      [batch, pos] for teacher-forced passes (e.g. the assistant tokens).
    op: "add" adds coeff*v; "ablate" removes coeff times the projection on v.
    Vectors are moved to each activation's device and dtype (works with device_map).
    """
    model = unwrap(model)
    parse_positions(positions)
    if op not in ("add", "ablate"):
        raise HookError(f"Unknown op {op!r}; use 'add' or 'ablate'.")
    given = {name: as_vector(name, v) for name, v in vectors.items()}
    points = [(get_hook_point(model, name), v) for name, v in given.items()]
    for hp, v in points:
        _check_vector(model, hp, v)
    check_finite(given, coeff=coeff)
    handles = []
    with _track_positions(model) as state:
        try:
            for hp, v in points:
                v = v.detach() if not v.requires_grad else v
                if hp.write_on == "output":

                    def out_hook(_m, _args, output, hp=hp, v=v):
                        h = get_tensor(output)
                        return replace_tensor(output, _act(hp, h, v, coeff, state, positions, op))

                    handles.append(hp.write_module.register_forward_hook(out_hook, prepend=True))
                else:

                    def in_hook(_m, args, kwargs, hp=hp, v=v):
                        h = input_tensor(args, kwargs)
                        return with_input(args, kwargs, _act(hp, h, v, coeff, state, positions, op))

                    handles.append(
                        hp.write_module.register_forward_pre_hook(
                            in_hook, with_kwargs=True, prepend=True
                        )
                    )
            yield
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class Recording(Mapping[str, torch.Tensor]):
    """Activations captured by `record`; rec[name] is [batch, pos, dim].

    Several forward passes (KV-cache generation) are concatenated along pos.
    """

    chunks: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        parts = self.chunks[name]
        if not parts:
            raise KeyError(f"{name} was hooked but no forward pass ran inside record()")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    def clear(self) -> None:
        for parts in self.chunks.values():
            parts.clear()


@contextmanager
def record(
    model: nn.Module | LoadedModel,
    hook_names: str | list[str],
    detach: bool = True,
    to_cpu: bool = False,
) -> Iterator[Recording]:
    """Capture activations at hook points (names or glob patterns) while inside the block.

    Values are read after any steering at the same hook point. With detach=False the
    recorded tensors keep their autograd graph (for losses on activations).
    """
    model = unwrap(model)
    names = select_hooks(model, hook_names)
    rec = Recording({n: [] for n in names})
    handles = []

    def keep(name: str, h: torch.Tensor, sl: slice | None) -> None:
        if sl is not None:
            h = h[..., sl]
        if detach:
            h = h.detach()
        if to_cpu:
            h = h.cpu()
        rec.chunks[name].append(h)

    try:
        for name in names:
            hp = get_hook_point(model, name)
            if hp.read_on == "output":

                def out_hook(_m, _args, output, name=name, sl=hp.channel_slice):
                    keep(name, get_tensor(output), sl)

                handles.append(hp.read_module.register_forward_hook(out_hook))
            else:

                def in_hook(_m, args, kwargs, name=name, sl=hp.channel_slice):
                    keep(name, input_tensor(args, kwargs), sl)

                handles.append(hp.read_module.register_forward_pre_hook(in_hook, with_kwargs=True))
        yield rec
    finally:
        for handle in handles:
            handle.remove()
