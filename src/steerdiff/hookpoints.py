"""Hook-point names and where they live: architecture families, naming, selection.

Hook names follow TransformerLens:

    blocks.{l}.hook_resid_pre        input of decoder block l               [batch, pos, d_model]
    blocks.{l}.ln1.hook_normalized   attention input (after the first norm) [batch, pos, d_model]
    blocks.{l}.attn.hook_q|k|v       q/k/v projections, heads flattened      [batch, pos, n_heads*d_head]
    blocks.{l}.hook_attn_out         what attention adds to the residual     [batch, pos, d_model]
    blocks.{l}.hook_resid_mid        residual after attention                [batch, pos, d_model]
    blocks.{l}.ln2.hook_normalized   MLP input (after the MLP's norm)         [batch, pos, d_model]
    blocks.{l}.hook_mlp_out          what the MLP adds to the residual        [batch, pos, d_model]
    blocks.{l}.hook_resid_post       output of decoder block l               [batch, pos, d_model]

Each architecture family maps these onto its HF modules in one `Family` entry below;
`get_hook_point` resolves a name to the module (and input or output) to read and
to write. `hooks.steer` / `hooks.record` act on what this module resolves; import
these names from `steerdiff.hooks`.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import Literal

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
        "To add one, add a Family entry to steerdiff/hookpoints.py mapping hook points to its modules."
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
    rest = m.group(3)
    if lo >= n or hi >= n:
        fix = f"'blocks.{lo}-{n - 1}.{rest}' or 'blocks.{lo}-.{rest}'" if lo < n else "layers"
        raise HookError(
            f"Layer range {m.group(1)}-{m.group(2)} in {pattern!r} is out of range: the model "
            f"has {n} layers (0-{n - 1}). Use {fix} within 0-{n - 1}."
        )
    if lo > hi:
        raise HookError(
            f"Empty layer range {lo}-{hi} in {pattern!r}; write the lower layer first "
            f"(e.g. 'blocks.{hi}-{lo}.{rest}')."
        )
    return [f"blocks.{layer}.{rest}" for layer in range(lo, hi + 1)]


def select_hooks(model: nn.Module | LoadedModel, patterns: str | list[str]) -> list[str]:
    """Names matching glob patterns, in model order.

    Patterns: exact names, shell globs (`blocks.*.hook_resid_post`), braces
    (`blocks.*.attn.hook_{q,k,v}`), layer ranges (`blocks.20-29.hook_resid_post`, or
    `blocks.20-.hook_resid_post` to the last layer). A pattern, or one alternative of its
    braces, that matches nothing, and a layer range past the last layer, raise HookError
    (listing the nearest names, or the valid layers).
    """
    model = unwrap(model)
    names = list_hook_points(model)
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    chosen: set[str] = set()
    for pat in patterns:
        for p in _expand_braces(pat):
            hits: set[str] = set()
            for q in _expand_ranges(p, n_layers(model)):
                hits |= set(fnmatch.filter(names, q))
            if not hits:
                raise HookError(_unknown_hook_message(p, names, pat))
            chosen |= hits
    return [n for n in names if n in chosen]


def _unknown_hook_message(name: str, names: list[str], pattern: str | None = None) -> str:
    near = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    within = f" (from {pattern!r})" if pattern is not None and pattern != name else ""
    m = _NAME_RE.match(name)
    if m and int(m.group(1)) >= len(names) // len(HOOK_SUFFIXES):
        extra = f" The model has {len(names) // len(HOOK_SUFFIXES)} layers (0-{len(names) // len(HOOK_SUFFIXES) - 1})."
    else:
        extra = ""
    hint = f" Nearest names: {', '.join(near)}." if near else ""
    return (
        f"Unknown hook point {name!r}{within}.{extra}{hint} Valid suffixes: {', '.join(HOOK_SUFFIXES)} "
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
        "dtype": lm.provenance()["dtype"],
        "dtype_reason": f"{lm.dtype_reason} (--dtype {lm.dtype_requested})",
        "load_seconds": round(lm.load_seconds, 2),
        "n_hook_points": len(list_hook_points(lm.model)),
        "hook_point_names_layer0": [
            n for n in list_hook_points(lm.model) if n.startswith("blocks.0.")
        ],
    }
