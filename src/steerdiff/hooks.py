"""Named hook points on Hugging Face modules, and the `steer` / `record` context managers.

Hook names follow TransformerLens:

    blocks.{l}.hook_resid_pre        input of decoder block l               [batch, pos, d_model]
    blocks.{l}.ln1.hook_normalized   attention input (after the first norm) [batch, pos, d_model]
    blocks.{l}.attn.hook_q|k|v       q/k/v projections, heads flattened      [batch, pos, n_heads*d_head]
    blocks.{l}.hook_attn_out         what attention adds to the residual     [batch, pos, d_model]
    blocks.{l}.hook_resid_mid        residual after attention                [batch, pos, d_model]
    blocks.{l}.ln2.hook_normalized   MLP input (after the MLP's norm)         [batch, pos, d_model]
    blocks.{l}.hook_mlp_out          what the MLP adds to the residual        [batch, pos, d_model]
    blocks.{l}.hook_resid_post       output of decoder block l               [batch, pos, d_model]

Each architecture family maps these onto its HF modules in one `Family` entry below.
Where a vector is *added*: at the named tensor itself, except `hook_resid_mid`, which
is written by adding to the attention output (the residual after attention then
carries the vector into the MLP's norm and onward, exactly as adding at the
residual would). Where a vector is *read* (`record`): at the named tensor, after
any steering of the same hook point.

Hooks are registered inside context managers and removed in ``finally``: a model
is never left steered after an error.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .errors import SteerdiffError
from .models import LoadedModel, count_parameters, unwrap

HOOK_SUFFIXES = (
    "hook_resid_pre",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "hook_mlp_out",
    "hook_resid_post",
)
RESIDUAL_SUFFIXES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


class HookError(SteerdiffError, ValueError):
    """Bad hook name, selection, or vector shape; the message says how to fix it."""


@dataclass(frozen=True)
class Family:
    """Where each hook point lives in one architecture family (paths relative to a block)."""

    name: str
    model_types: tuple[str, ...]
    blocks: str  # ModuleList of decoder blocks, relative to the CausalLM
    final_norm: str  # final norm before the unembedding
    ln1: str
    ln2: str  # the norm whose output feeds the MLP
    attn_out: str  # module whose output is added to the residual after attention
    mlp_out: str  # module whose output is added to the residual after the MLP
    q: str
    k: str
    v: str
    fused_qkv: bool = False  # gpt2: one c_attn Linear emits [q | k | v]


FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "olmo2"),
        blocks="model.layers",
        final_norm="model.norm",
        ln1="input_layernorm",
        ln2="post_attention_layernorm",
        attn_out="self_attn.o_proj",
        mlp_out="mlp",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
    ),
    Family(
        name="gemma",
        model_types=("gemma2", "gemma3_text", "gemma3"),
        blocks="model.layers",
        final_norm="model.norm",
        ln1="input_layernorm",
        ln2="pre_feedforward_layernorm",
        attn_out="post_attention_layernorm",  # gemma norms the attention output before adding
        mlp_out="post_feedforward_layernorm",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
    ),
    Family(
        name="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        ln1="ln_1",
        ln2="ln_2",
        attn_out="attn.c_proj",
        mlp_out="mlp",
        q="attn.c_attn",
        k="attn.c_attn",
        v="attn.c_attn",
        fused_qkv=True,
    ),
)
# Friendly family names for messages; qwen2/qwen3 share the llama layout.
FAMILY_LABELS = "llama (SmolLM2, Llama 3, Mistral), qwen2, qwen3, gemma2, gemma3, gpt2"


def family_of(model: nn.Module | LoadedModel) -> Family:
    model = unwrap(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise HookError(
        f"Unsupported model family {model_type!r}. Supported families: {FAMILY_LABELS}. "
        "To add one, add a Family entry to steerdiff/hooks.py mapping hook points to its modules."
    )


def get_blocks(model: nn.Module | LoadedModel) -> nn.ModuleList:
    model = unwrap(model)
    return model.get_submodule(family_of(model).blocks)  # type: ignore[return-value]


def n_layers(model: nn.Module | LoadedModel) -> int:
    return len(get_blocks(model))


@dataclass(frozen=True)
class HookPoint:
    """A resolved hook point: which module, whether its input or output, which slice."""

    name: str
    layer: int
    suffix: str
    read_module: nn.Module
    read_on: Literal["input", "output"]
    write_module: nn.Module
    write_on: Literal["input", "output"]
    dim: int
    channel_slice: slice | None = None  # gpt2 fused qkv


def _out_features(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    nf = getattr(m, "nf", None)  # transformers Conv1D (gpt2)
    if nf is not None:
        return int(nf)
    raise HookError(f"Cannot tell the output width of {m.__class__.__name__}")


def _hook_point(model: nn.Module, layer: int, suffix: str) -> HookPoint:
    fam = family_of(model)
    block = get_blocks(model)[layer]
    d_model = model.config.hidden_size
    name = f"blocks.{layer}.{suffix}"
    if suffix == "hook_resid_pre":
        return HookPoint(name, layer, suffix, block, "input", block, "input", d_model)
    if suffix == "hook_resid_post":
        return HookPoint(name, layer, suffix, block, "output", block, "output", d_model)
    if suffix == "hook_resid_mid":
        ln2, attn_out = block.get_submodule(fam.ln2), block.get_submodule(fam.attn_out)
        return HookPoint(name, layer, suffix, ln2, "input", attn_out, "output", d_model)
    simple = {
        "ln1.hook_normalized": fam.ln1,
        "ln2.hook_normalized": fam.ln2,
        "hook_attn_out": fam.attn_out,
        "hook_mlp_out": fam.mlp_out,
    }
    if suffix in simple:
        m = block.get_submodule(simple[suffix])
        return HookPoint(name, layer, suffix, m, "output", m, "output", d_model)
    if suffix in ("attn.hook_q", "attn.hook_k", "attn.hook_v"):
        which = suffix[-1]
        m = block.get_submodule(getattr(fam, which))
        if fam.fused_qkv:
            i = "qkv".index(which)
            sl = slice(i * d_model, (i + 1) * d_model)
            return HookPoint(name, layer, suffix, m, "output", m, "output", d_model, sl)
        dim = _out_features(m)
        return HookPoint(name, layer, suffix, m, "output", m, "output", dim)
    raise HookError(f"Unknown hook suffix {suffix!r}")


def list_hook_points(model: nn.Module | LoadedModel) -> list[str]:
    """Every hook point name of the model, layer by layer."""
    model = unwrap(model)
    return [f"blocks.{layer}.{s}" for layer in range(n_layers(model)) for s in HOOK_SUFFIXES]


_NAME_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    out = []
    for alt in m.group(1).split(","):
        out += _expand_braces(pattern[: m.start()] + alt.strip() + pattern[m.end() :])
    return out


def _expand_ranges(pattern: str, n: int) -> list[str]:
    """blocks.20-29.x -> blocks.20.x ... blocks.29.x; also 'blocks.20-.x' (to the last layer)."""
    m = re.match(r"^blocks\.(\d*)-(\d*)\.(.+)$", pattern)
    if not m:
        return [pattern]
    lo = int(m.group(1)) if m.group(1) else 0
    hi = int(m.group(2)) if m.group(2) else n - 1
    if lo > hi:
        raise HookError(f"Empty layer range {lo}-{hi} in {pattern!r}")
    return [f"blocks.{layer}.{m.group(3)}" for layer in range(lo, hi + 1)]


def select_hooks(model: nn.Module | LoadedModel, patterns: str | list[str]) -> list[str]:
    """Names matching glob patterns, in model order.

    Patterns: exact names, shell globs (`blocks.*.hook_resid_post`), braces
    (`blocks.*.attn.hook_{q,k,v}`), layer ranges (`blocks.20-29.hook_resid_post`).
    A pattern that matches nothing raises HookError listing the nearest names.
    """
    model = unwrap(model)
    names = list_hook_points(model)
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    chosen: set[str] = set()
    for pat in patterns:
        hits: set[str] = set()
        for p in _expand_braces(pat):
            for q in _expand_ranges(p, n_layers(model)):
                hits |= set(fnmatch.filter(names, q))
        if not hits:
            raise HookError(_unknown_hook_message(pat, names))
        chosen |= hits
    return [n for n in names if n in chosen]


def _unknown_hook_message(name: str, names: list[str]) -> str:
    near = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    m = _NAME_RE.match(name)
    if m and int(m.group(1)) >= len(names) // len(HOOK_SUFFIXES):
        extra = f" The model has {len(names) // len(HOOK_SUFFIXES)} layers (0-{len(names) // len(HOOK_SUFFIXES) - 1})."
    else:
        extra = ""
    hint = f" Nearest names: {', '.join(near)}." if near else ""
    return (
        f"Unknown hook point {name!r}.{extra}{hint} Valid suffixes: {', '.join(HOOK_SUFFIXES)} "
        "(e.g. 'blocks.5.hook_resid_post'); see list_hook_points(model) or `steerdiff info`."
    )


def get_hook_point(model: nn.Module | LoadedModel, name: str) -> HookPoint:
    model = unwrap(model)
    m = _NAME_RE.match(name)
    if not m or m.group(2) not in HOOK_SUFFIXES or int(m.group(1)) >= n_layers(model):
        raise HookError(_unknown_hook_message(name, list_hook_points(model)))
    return _hook_point(model, int(m.group(1)), m.group(2))


def hook_dim(model: nn.Module | LoadedModel, name: str) -> int:
    """Width of the tensor at a hook point (d_model, or n_heads*d_head for q/k/v)."""
    return get_hook_point(model, name).dim


# ----------------------------------------------------------------------------- positions

Positions = str | torch.Tensor  # "all" | "prompt" | "response" | "first:k" | bool mask [batch, pos]


@dataclass
class _ForwardState:
    """What the current forward pass looks like, read by a pre-hook on the whole model."""

    past_len: int = 0  # tokens already in the KV cache
    cur_len: int = 0  # tokens in this forward
    attention_mask: torch.Tensor | None = None  # [batch, past_len + cur_len]
    prompt_len: int | None = None  # length of the last prefill (forward with an empty cache)


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
        if state.past_len == 0:
            state.prompt_len = cur

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


# ----------------------------------------------------------------------------- steer / record

VectorsLike = Mapping[str, torch.Tensor]  # a VectorSet or a dict hook name -> [dim]


def _get_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def _replace_tensor(x: Any, new: torch.Tensor) -> Any:
    return (new, *x[1:]) if isinstance(x, tuple) else new


def _input_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_input(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
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

    vectors: a VectorSet or dict {hook name: tensor [dim]}.
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
    points = [(get_hook_point(model, name), v) for name, v in vectors.items()]
    for hp, v in points:
        _check_vector(model, hp, v)
    handles = []
    with _track_positions(model) as state:
        try:
            for hp, v in points:
                v = v.detach() if not v.requires_grad else v
                if hp.write_on == "output":

                    def out_hook(_m, _args, output, hp=hp, v=v):
                        h = _get_tensor(output)
                        return _replace_tensor(output, _act(hp, h, v, coeff, state, positions, op))

                    handles.append(hp.write_module.register_forward_hook(out_hook, prepend=True))
                else:

                    def in_hook(_m, args, kwargs, hp=hp, v=v):
                        h = _input_tensor(args, kwargs)
                        return _with_input(
                            args, kwargs, _act(hp, h, v, coeff, state, positions, op)
                        )

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
                    keep(name, _get_tensor(output), sl)

                handles.append(hp.read_module.register_forward_hook(out_hook))
            else:

                def in_hook(_m, args, kwargs, name=name, sl=hp.channel_slice):
                    keep(name, _input_tensor(args, kwargs), sl)

                handles.append(hp.read_module.register_forward_pre_hook(in_hook, with_kwargs=True))
        yield rec
    finally:
        for handle in handles:
            handle.remove()


def final_norm(model: nn.Module | LoadedModel) -> nn.Module:
    model = unwrap(model)
    return model.get_submodule(family_of(model).final_norm)


def describe(lm: LoadedModel) -> dict:
    """A summary of a loaded model: family, sizes, weights hash and its hook points."""
    cfg = lm.model.config
    fam = family_of(lm.model)
    return {
        "model": lm.spec,
        "source": lm.source,
        "family": fam.name,
        "model_type": cfg.model_type,
        "n_layers": cfg.num_hidden_layers,
        "d_model": cfg.hidden_size,
        "n_parameters": count_parameters(lm.model),
        "weights_hash": lm.weights_hash,
        "load_seconds": round(lm.load_seconds, 2),
        "n_hook_points": len(list_hook_points(lm.model)),
        "hook_point_names_layer0": [
            n for n in list_hook_points(lm.model) if n.startswith("blocks.0.")
        ],
    }
