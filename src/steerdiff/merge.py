"""Bake a vector set into an ordinary Hugging Face checkpoint: steering as biases.

A vector added at every token position is a constant; added to the output of a linear
projection, it is a bias. So a vector set steered at positions "all" can be written into
the model's weights, and vLLM (`vllm serve OUT`) or any engine runs the result steered,
with none of our hooks. Where each hook's vector goes (W v: the vector enters that
projection's input; docs/export.md has the reasons and the refusals):

    hook                 llama qwen2 mistral   qwen3            gemma2 gemma3   gpt2
    attn.hook_q|k|v      q/k/v_proj bias       q/k/v_proj bias  q/k/v_proj bias c_attn third
    ln1.hook_normalized  q/k/v_proj += W v     q/k/v_proj += Wv q/k/v_proj += Wv c_attn += W v
    hook_attn_out|_mid   o_proj bias           refused          refused         attn.c_proj
    ln2.hook_normalized  gate/up_proj += W v   refused          refused         mlp.c_fc += W v
    hook_mlp_out|_post   down_proj bias        refused          refused         mlp.c_proj
    hook_resid_pre       block l > 0: hook_resid_post of block l - 1; block 0: every row of
                         the token embedding (untied only; gemma: v / its scale), gpt2: wpe

A qwen2 / mistral needing o_proj or MLP biases is written as a llama (same computation).
Refused, in one line naming the hook: positions other than "all"; gemma's post-normed
outputs; qwen3's o_proj/MLP (vLLM's Qwen3 would drop the bias silently). A contrast
VectorSet's metadata `positions` says where it was *read*; where it is *added* is the
`positions` argument here (a fit's vectors: all).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .errors import SteerdiffError
from .hooks import HookError, check_finite, family_of, get_hook_point, n_layers
from .io import atomic_write_json, file_sha256, provenance
from .models import LoadedModel, cache_dir, unwrap, weights_hash_of_model

MERGE_FILE = "steerdiff_merged.json"  # the provenance file of a merged folder

# For each model type: group -> the config flag that gives those modules a bias
# (None: they always have one). A group missing here cannot hold a bias in this class.
BIASES: dict[str, dict[str, str | None]] = {
    "llama": {
        **dict.fromkeys(("q", "k", "v", "o"), "attention_bias"),
        **dict.fromkeys(("gate", "up", "down"), "mlp_bias"),
        "embed": None,
    },
    "qwen2": {"q": None, "k": None, "v": None, "embed": None},
    "mistral": {"embed": None},
    # qwen3: HF gives o_proj a bias with attention_bias too, but vLLM's Qwen3 drops it
    "qwen3": {**dict.fromkeys(("q", "k", "v"), "attention_bias"), "embed": None},
    "gemma2": {**dict.fromkeys(("q", "k", "v"), "attention_bias"), "embed": None},
    "gemma3_text": {**dict.fromkeys(("q", "k", "v"), "attention_bias"), "embed": None},
    "gpt2": dict.fromkeys(("c_attn", "c_proj", "c_fc", "mlp_c_proj", "wpe"), None),
}
AS_LLAMA = ("qwen2", "mistral")  # the same computation as a llama (no sliding window)
FLAG_GROUPS = {"attention_bias": ("q", "k", "v", "o"), "mlp_bias": ("gate", "up", "down")}
# Module of each group inside a block (gpt2's groups are its own module names).
MODULES = {
    **{g: f"self_attn.{g}_proj" for g in ("q", "k", "v", "o")},
    **{g: f"mlp.{g}_proj" for g in ("gate", "up", "down")},
    **{"c_attn": "attn.c_attn", "c_proj": "attn.c_proj", "c_fc": "mlp.c_fc"},
    "mlp_c_proj": "mlp.c_proj",
}
_AFTER_MLP = ("hook_mlp_out", "hook_resid_post")
POST_NORM = (
    "gemma norms the attention and MLP outputs before adding them to the residual, so no "
    "bias adds a fixed vector there"
)


class MergeError(SteerdiffError, ValueError):
    """A vector set that cannot be written as biases, or a folder that cannot be written."""


@dataclass(frozen=True)
class Target:
    """One parameter a hook's vector goes into."""

    group: str  # which bias option it needs ("q", "down", "embed", ...)
    module: str  # module path in the CausalLM, e.g. "model.layers.3.self_attn.q_proj"
    through: bool = False  # the vector enters the module's input: add W v to its bias
    channels: slice | None = None  # gpt2's fused c_attn: the q, k or v third

    @property
    def param(self) -> str:
        return f"{self.module}.{'weight' if self.group in ('embed', 'wpe') else 'bias'}"


@dataclass
class MergePlan:
    """What merging a vector set changes in a model (see `plan_merge`)."""

    params: dict[str, torch.Tensor]  # parameter name -> its new value (model dtype)
    config: dict[str, Any]  # config fields to set, e.g. {"attention_bias": True}
    model_type: str  # of the written checkpoint ("llama" for a rewritten qwen2 / mistral)
    placed: dict[str, list[str]] = field(default_factory=dict)  # hook -> parameters


def _refuse(hook: str, model_type: str, why: str) -> MergeError:
    return MergeError(
        f"Cannot merge {hook} into a {model_type} model as biases: {why}. Steer it with hooks "
        "instead (the hf backend, `--backend hf`), or fit/extract at a hook this family can "
        "merge (see docs/export.md)."
    )


def _block_targets(fam_name: str, prefix: str, suffix: str) -> list[Target]:
    """Targets of a block-internal hook (`prefix` = "model.layers.3.")."""
    gpt2 = fam_name == "gpt2"

    def t(group: str, **kw: Any) -> Target:
        return Target(group, prefix + MODULES[group], **kw)

    if suffix.startswith("attn.hook_"):
        return [t("c_attn") if gpt2 else t(suffix[-1])]
    if suffix == "ln1.hook_normalized":
        return [t("c_attn", through=True)] if gpt2 else [t(g, through=True) for g in "qkv"]
    if suffix in ("hook_attn_out", "hook_resid_mid"):
        return [t("c_proj" if gpt2 else "o")]
    if suffix == "ln2.hook_normalized":
        groups = ("c_fc",) if gpt2 else ("gate", "up")
        return [t(g, through=True) for g in groups]
    return [t("mlp_c_proj" if gpt2 else "down")]  # _AFTER_MLP


def targets_of(model: nn.Module, hook: str) -> list[Target]:
    """The parameters the vector at `hook` goes into (MergeError where there are none)."""
    hp = get_hook_point(model, hook)
    fam, model_type = family_of(model), model.config.model_type
    if model_type not in BIASES:
        why = f"merging supports {', '.join(BIASES)}; this model type has no entry in merge.BIASES"
        raise _refuse(hook, model_type, why)
    layer, suffix = hp.layer, hp.suffix
    if suffix == "hook_resid_pre" and layer == 0:
        return [_embedding_target(model, hook)]
    if suffix == "hook_resid_pre":  # the same point as the previous block's output
        layer, suffix = layer - 1, "hook_resid_post"
    if fam.name == "gemma" and suffix in ("hook_attn_out", "hook_resid_mid") + _AFTER_MLP:
        raise _refuse(hook, model_type, POST_NORM)
    found = _block_targets(fam.name, f"{fam.blocks}.{layer}.", suffix)
    if hp.channel_slice is not None:
        found = [replace(x, channels=hp.channel_slice) for x in found]
    return found


def _embedding_target(model: nn.Module, hook: str) -> Target:
    """blocks.0.hook_resid_pre: every row of the token (gpt2: position) embedding."""
    if model.config.model_type == "gpt2":
        return Target("wpe", "transformer.wpe")
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if model.config.tie_word_embeddings or (head is not None and head.weight is emb.weight):
        raise _refuse(
            hook,
            model.config.model_type,
            "its token embedding is tied to the unembedding (lm_head), so adding to its rows "
            "would change every logit too",
        )
    name = next(n for n, m in model.named_modules() if m is emb)
    return Target("embed", name)


def _written_type(model: nn.Module, found: dict[str, list[Target]]) -> str:
    """The model type of the merged checkpoint: its own, or llama for a qwen2 / mistral
    that needs biases its own class lacks."""
    cfg, own = model.config, model.config.model_type
    groups = {t.group for ts in found.values() for t in ts}
    if groups <= set(BIASES[own]) or own not in AS_LLAMA or not groups <= set(BIASES["llama"]):
        return own
    if getattr(cfg, "use_sliding_window", False) or (
        own == "mistral" and getattr(cfg, "sliding_window", None) is not None
    ):
        hook = next(h for h, ts in found.items() if any(t.group not in BIASES[own] for t in ts))
        why = (
            "its class has no bias there, and the llama checkpoint it would be written as has "
            "no sliding window (this config uses one)"
        )
        raise _refuse(hook, own, why)
    return "llama"


def _current(model: nn.Module, param: str) -> torch.Tensor:
    """A parameter's value, or zeros for a bias the module does not have yet."""
    path, leaf = param.rsplit(".", 1)
    module = model.get_submodule(path)
    p = getattr(module, leaf, None)
    if p is not None:
        return p.detach()
    w = module.weight
    return torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)  # nn.Linear: [out, in]


def _delta(model: nn.Module, t: Target, v: torch.Tensor) -> torch.Tensor:
    """What `t`'s parameter gains from vector v [dim], in float32."""
    module = model.get_submodule(t.module)
    v = v.detach().float().to(module.weight.device)
    if t.through:  # nn.Linear weight [out, in]; gpt2's Conv1D weight [in, out]
        w = module.weight.float()
        return w @ v if isinstance(module, nn.Linear) else v @ w
    if t.channels is not None:
        out = torch.zeros(module.weight.shape[1], device=v.device)  # Conv1D: [in, out]
        out[t.channels] = v
        return out
    if t.group == "embed":  # gemma scales its embedding by sqrt(d_model), in the model dtype
        scale = getattr(module, "scalar_embed_scale", None)
        if scale is not None:
            return v / float(torch.tensor(scale, dtype=module.weight.dtype))
    return v


def check_positions(positions: str) -> None:
    """Only vectors added at every position are biases."""
    if positions != "all":
        raise MergeError(
            f"positions={positions!r}: only vectors added at every position are biases (a "
            "bias cannot tell prompt from response tokens); use positions 'all', or steer with "
            "hooks (`--backend hf`)."
        )


def plan_merge(
    model: LoadedModel | nn.Module,
    vectors: Mapping[str, torch.Tensor],
    coeff: float = 1.0,
    positions: str = "all",
) -> MergePlan:
    """The new parameter values and config flags that add `coeff * vectors` at every position.

    Several vectors on one parameter are summed; the sum is taken in float32 and cast to the
    model's dtype once. Raises MergeError (one line naming the hook and the fix) for what no
    bias can express.
    """
    hf = unwrap(model)
    check_positions(positions)
    check_finite(vectors, coeff=coeff)
    found: dict[str, list[Target]] = {}
    for name in vectors:
        try:
            found[name] = targets_of(hf, name)
        except HookError as e:  # an unknown family or hook name: say which hook and the fix
            raise MergeError(f"Cannot merge {name}: {e}") from e
    for name, v in vectors.items():
        dim = get_hook_point(hf, name).dim
        if tuple(v.shape) != (dim,):
            raise MergeError(
                f"The vector for {name} has shape {tuple(v.shape)}, expected ({dim},) on this "
                "model; merge a vector set made for this model."
            )
    model_type = _written_type(hf, found)
    table = BIASES[model_type]
    deltas: dict[str, torch.Tensor] = {}
    placed: dict[str, list[str]] = {}
    for name, ts in found.items():
        for t in ts:
            if t.group not in table:
                why = f"{t.module} has no bias option in {type(hf).__name__} (or in vLLM's)"
                raise _refuse(name, hf.config.model_type, why)
            d = coeff * _delta(hf, t, vectors[name])
            deltas[t.param] = deltas[t.param] + d if t.param in deltas else d
            placed.setdefault(name, []).append(t.param)
    flags = {table[t.group] for ts in found.values() for t in ts} - {None}
    params: dict[str, torch.Tensor] = {}
    fam = family_of(hf)
    for flag in sorted(flags):  # the flag gives every layer's modules a bias: zeros if unset
        for layer in range(n_layers(hf)):
            for g in FLAG_GROUPS[flag]:
                key = f"{fam.blocks}.{layer}.{MODULES[g]}.bias"
                params[key] = _current(hf, key)
    for key, d in deltas.items():
        base = params.get(key, _current(hf, key))
        params[key] = (base.float() + d.to(base.device)).to(base.dtype)
    return MergePlan(params, {f: True for f in sorted(flags)}, model_type, placed)


def merge_vectors(
    lm: LoadedModel | nn.Module,
    vectors: Mapping[str, torch.Tensor],
    coeff: float = 1.0,
    positions: str = "all",
) -> PreTrainedModel:
    """A copy of the model with `coeff * vectors` baked into its biases; the model given is
    not changed. The copy keeps its class (a qwen2 that `export_merged` writes as a llama
    stays a Qwen2 model here, with the extra biases on its modules)."""
    plan = plan_merge(lm, vectors, coeff, positions)
    merged = copy.deepcopy(unwrap(lm))
    for name, value in plan.params.items():
        path, leaf = name.rsplit(".", 1)
        setattr(merged.get_submodule(path), leaf, nn.Parameter(value.clone(), requires_grad=False))
    for key, value in plan.config.items():
        setattr(merged.config, key, value)
    return merged


def vectors_sha256(vectors: Mapping[str, torch.Tensor]) -> str:
    """A hash of a vector set's names and float32 values (first 16 hex characters)."""
    h = hashlib.sha256()
    for name in sorted(vectors):
        h.update(name.encode() + b"\0")
        h.update(vectors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _merged_config(hf: PreTrainedModel, plan: MergePlan) -> Any:
    cfg = copy.deepcopy(hf.config)
    if plan.model_type != cfg.model_type:  # qwen2 / mistral written as a llama
        from transformers import LlamaConfig

        d = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "architectures")}
        cfg = LlamaConfig(**d)
        cfg.architectures = ["LlamaForCausalLM"]
    for key, value in plan.config.items():
        setattr(cfg, key, value)
    return cfg


@contextmanager
def _new_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temp folder beside `out` that becomes `out` once complete; an old `out` is kept
    until then (and removed only with overwrite)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MergeError(
            f"{out} already exists and is not empty; choose another folder or pass "
            "--overwrite (the old folder is kept until the new one is complete)."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        yield tmp
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700, safetensors files 0600
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~mask)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.rename(out, old / "out")
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old / "out", out)  # put the old folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def export_merged(
    lm: LoadedModel | nn.Module,
    vectors: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    coeff: float = 1.0,
    positions: str = "all",
    vectors_file: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the model with `coeff * vectors` as biases to `out_dir`: a plain Hugging Face
    folder (weights, config, tokenizer) plus `steerdiff_merged.json` (base model and weights
    hash, vector hash and file, coeff, where each hook went). Written to a temp folder and
    renamed, so `out_dir` is either complete or untouched. Only the changed parameters are
    new tensors: the rest of the weights are saved from the model without a copy.
    """
    t0 = time.perf_counter()
    plan = plan_merge(lm, vectors, coeff, positions)
    hf = unwrap(lm)
    state = {**hf.state_dict(), **plan.params}
    prov = provenance(lm if isinstance(lm, LoadedModel) else None)
    if "weights_hash" not in prov:  # a bare model: hash its tensors
        prov["weights_hash"] = weights_hash_of_model(hf)
    meta = {
        "kind": "steerdiff merged checkpoint",
        "base_model": prov.pop("model_id", "in-memory"),
        "base_source": prov.pop("model_source", "in-memory"),
        "base_weights_hash": prov.pop("weights_hash"),
        "base_model_type": hf.config.model_type,
        "model_type": plan.model_type,
        "vectors_sha256": vectors_sha256(vectors),
        "vectors_file": str(vectors_file) if vectors_file else None,
        "vectors_file_sha256": file_sha256(vectors_file)[:16] if vectors_file else None,
        "vectors_metadata": dict(getattr(vectors, "metadata", {}) or {}),
        "coeff": coeff,
        "positions": positions,
        "config_changes": plan.config,
        "hooks": plan.placed,
        **prov,
    }
    with _new_folder(Path(out_dir), overwrite) as tmp:
        hf.save_pretrained(tmp, state_dict=state)
        _merged_config(hf, plan).save_pretrained(tmp)  # replaces the config.json just written
        tokenizer = getattr(lm, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta["export_seconds"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(tmp / MERGE_FILE, meta)
    return Path(out_dir)


def merged_model_folder(
    lm: LoadedModel,
    vectors: Mapping[str, torch.Tensor] | None = None,
    coeff: float = 1.0,
    positions: str = "all",
) -> Path:
    """The merged checkpoint of `lm` + `vectors` in the steerdiff cache, exported on first
    use and reused after (keyed by the weights hash, the vector hash, coeff and dtype).
    With no vectors it is the model itself as a Hugging Face folder (e.g. of a GGUF file)."""
    vectors = vectors or {}
    check_positions(positions)  # not in the key: a cached "all" folder must not serve others
    dtype = str(next(lm.model.parameters()).dtype)
    key = json.dumps([lm.weights_hash, vectors_sha256(vectors), float(coeff), dtype])
    target = cache_dir() / "merged" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (target / MERGE_FILE).exists():
        return target
    try:
        export_merged(lm, vectors, target, coeff, positions)
    except MergeError:
        if not (target / MERGE_FILE).exists():  # not another process finishing first
            raise
    return target
