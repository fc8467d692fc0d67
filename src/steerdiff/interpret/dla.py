"""Direct logit attribution (DLA) of a vector in the residual stream.

A vector v added to the residual stream reaches the logits directly through the
final norm and the unembedding: logits += W_U (gamma * v) / rms, where gamma is the
final norm's per-channel scale. DLA reads that direct path (later layers' reactions
to v are ignored; the activation-difference lens in `lens.py` measures those).

Centring: W_U is replaced by W_U - mean over the vocabulary of W_U. This removes the
part of v's effect that shifts every logit by the same amount (mean_t W_U[t] . v),
so scores are comparable across vectors and hooks (their mean over the vocabulary
is zero). Note that a shift of every logit by one constant cannot change the
*ranking* of tokens of one vector: top-k lists of one vector are the same with and
without centring; scores, cosines and magnitudes are not.

The final-norm scale (`norm_scale=True`) multiplies v by gamma (RMSNorm weight; Gemma's
1 + weight; LayerNorm weight after removing v's mean over d_model). The 1/rms factor is
a positive number per token and does not change rankings; it is left out.

Hooks where DLA applies: blocks.{l}.hook_resid_pre|hook_resid_mid|hook_resid_post and
blocks.{l}.hook_attn_out|hook_mlp_out (these write into the residual stream). Vectors at
q/k/v or at a norm's output (ln1/ln2.hook_normalized) never enter the residual stream
directly: use the activation-difference lens for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SteerdiffError
from ..hooks import final_norm, get_hook_point
from ..models import LoadedModel, unwrap
from ..vectors import VectorSet, VectorSetError

DLA_SUFFIXES = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
)


class DLAError(SteerdiffError, ValueError):
    """DLA cannot be read for this hook or vector; the message says what to use instead."""


@dataclass
class TokenScore:
    token_id: int
    token: str
    score: float


@dataclass
class DLAResult:
    """Top and bottom tokens of one vector's direct logit attribution."""

    hook: str
    top: list[TokenScore]
    bottom: list[TokenScore]
    center: bool
    norm_scale: bool
    vector_norm: float
    scores: torch.Tensor | None = field(default=None, repr=False)  # [vocab]

    def top_ids(self) -> list[int]:
        return [t.token_id for t in self.top]

    def to_dict(self) -> dict:
        return {
            "hook": self.hook,
            "center": self.center,
            "norm_scale": self.norm_scale,
            "vector_norm": self.vector_norm,
            "top": [t.__dict__ for t in self.top],
            "bottom": [t.__dict__ for t in self.bottom],
        }


def check_dla_hook(hook: str) -> None:
    """Raise DLAError for hooks whose vectors do not live in the residual stream."""
    suffix = hook.split(".", 2)[-1] if hook.startswith("blocks.") else hook
    if suffix in DLA_SUFFIXES:
        return
    if suffix in ("attn.hook_q", "attn.hook_k", "attn.hook_v"):
        why = "a q/k/v vector lives in the attention heads' space, not the residual stream"
    elif suffix in ("ln1.hook_normalized", "ln2.hook_normalized"):
        why = (
            "a vector added after a norm (attention/MLP input) is read by the next linear "
            "layer only and never reaches the residual stream directly"
        )
    else:
        why = "it is not a residual-stream hook"
    raise DLAError(
        f"Direct logit attribution does not apply to {hook}: {why}. Read its effect with the "
        "activation-difference lens instead (`steerdiff read lens`, "
        "steerdiff.interpret.lens.activation_difference_lens), which measures how the vector "
        "changes the residual stream at later hooks and reads those differences through the "
        f"unembedding. DLA applies to hooks ending in: {', '.join(DLA_SUFFIXES)}."
    )


def norm_scale_vector(model: nn.Module | LoadedModel) -> tuple[torch.Tensor, bool]:
    """(gamma [d_model], centres_input) of the final norm.

    RMSNorm-like norms: gamma = norm(ones), which is the weight (Gemma: 1 + weight) up to
    the eps factor. LayerNorm: its weight, and it subtracts the mean over d_model first.
    """
    hf = unwrap(model)
    norm = final_norm(hf)
    d = hf.config.hidden_size
    p = next(norm.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    if isinstance(norm, nn.LayerNorm):
        w = norm.weight if norm.weight is not None else torch.ones(d, device=device)
        return w.detach().float(), True
    with torch.no_grad():
        gamma = norm(torch.ones(1, 1, d, dtype=dtype, device=device))[0, 0].float()  # [d]
    return gamma, False


def logit_basis(
    model: nn.Module | LoadedModel, center: bool = True, norm_scale: bool = True
) -> torch.Tensor:
    """Effective unembedding [vocab, d_model]: DLA scores of v are basis @ v.

    center: subtract the mean over the vocabulary (rows) of the unembedding.
    norm_scale: fold in the final norm's per-channel scale (and LayerNorm's centring).
    """
    hf = unwrap(model)
    w_u = hf.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
    if norm_scale:
        gamma, centres = norm_scale_vector(hf)
        w_u = w_u * gamma.to(w_u.device)[None, :]
        if centres:  # LayerNorm: v -> v - mean(v); fold into the basis
            w_u = w_u - w_u.mean(dim=1, keepdim=True)
    if center:
        w_u = w_u - w_u.mean(dim=0, keepdim=True)
    return w_u


def _as_vector(model: nn.Module, vectors, hook: str | None) -> tuple[str, torch.Tensor]:
    hf = unwrap(model)
    if isinstance(vectors, torch.Tensor):
        v, name = vectors, hook or "vector"
    else:
        if isinstance(vectors, VectorSet):
            vectors.check_fits(hf)
        if hook is None:
            if len(vectors) != 1:
                raise DLAError(
                    f"The vector set has {len(vectors)} hooks ({', '.join(list(vectors)[:5])}...); "
                    "say which one with hook=..."
                )
            hook = next(iter(vectors))
        if hook not in vectors:
            raise DLAError(f"Hook {hook} is not in the vector set; it has: {', '.join(vectors)}")
        v, name = vectors[hook], hook
    if name.startswith("blocks."):
        check_dla_hook(name)
        get_hook_point(hf, name)  # raises HookError for layers the model lacks
    d = hf.config.hidden_size
    if v.dim() != 1 or v.shape[0] != d:
        raise VectorSetError(
            f"Vector for {name} has shape {tuple(v.shape)}; this model's residual stream has "
            f"d_model={d}. Was the vector made for another model?"
        )
    return name, v.detach().float()


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [f"<{i}>" for i in ids]
    return [tokenizer.decode([i]) for i in ids]


def top_tokens(
    scores: torch.Tensor, k: int, tokenizer=None
) -> tuple[list[TokenScore], list[TokenScore]]:
    """Top-k and bottom-k tokens of scores [vocab]."""
    k = min(k, scores.shape[0])
    top = torch.topk(scores, k)
    bot = torch.topk(-scores, k)
    top_ids, bot_ids = top.indices.tolist(), bot.indices.tolist()
    return (
        [
            TokenScore(i, s, float(scores[i]))
            for i, s in zip(top_ids, token_strings(tokenizer, top_ids), strict=False)
        ],
        [
            TokenScore(i, s, float(scores[i]))
            for i, s in zip(bot_ids, token_strings(tokenizer, bot_ids), strict=False)
        ],
    )


def dla_scores(
    model: nn.Module | LoadedModel,
    vectors: Mapping[str, torch.Tensor] | torch.Tensor,
    hook: str | None = None,
    center: bool = True,
    norm_scale: bool = True,
    basis: torch.Tensor | None = None,
) -> torch.Tensor:
    """DLA scores [vocab] of one vector (a tensor [d_model] or one hook of a VectorSet)."""
    _, v = _as_vector(unwrap(model), vectors, hook)
    basis = logit_basis(model, center, norm_scale) if basis is None else basis
    return basis @ v.to(basis.device)  # [vocab]


def direct_logit_attribution(
    model: nn.Module | LoadedModel,
    vectors: Mapping[str, torch.Tensor] | torch.Tensor,
    hook: str | None = None,
    k: int = 20,
    center: bool = True,
    norm_scale: bool = True,
    tokenizer=None,
) -> DLAResult:
    """Top/bottom-k tokens of the (centred) DLA of one vector.

    vectors: a VectorSet / dict (pick the hook with `hook`, optional if it has one) or a
    tensor [d_model] (then `hook` is only a label, checked if it names a hook point).
    """
    hf = unwrap(model)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    name, v = _as_vector(hf, vectors, hook)
    scores = logit_basis(hf, center, norm_scale) @ v.to(hf.device)  # [vocab]
    top, bottom = top_tokens(scores, k, tok)
    return DLAResult(name, top, bottom, center, norm_scale, float(v.norm()), scores.cpu())


def dla_table(
    model: nn.Module | LoadedModel,
    vectors: Mapping[str, torch.Tensor],
    k: int = 20,
    center: bool = True,
    norm_scale: bool = True,
) -> tuple[list[DLAResult], dict[str, str]]:
    """DLA of every hook of a set; hooks where DLA does not apply are returned with why."""
    if isinstance(vectors, VectorSet):
        vectors.check_fits(unwrap(model))
    results, skipped = [], {}
    for name in vectors:
        try:
            check_dla_hook(name)
        except DLAError as e:
            skipped[name] = str(e)
            continue
        results.append(direct_logit_attribution(model, vectors, name, k, center, norm_scale))
    return results, skipped


def overlap(a: DLAResult | list[int], b: DLAResult | list[int], k: int | None = None) -> int:
    """How many of the top-k token ids two DLA results share."""
    ia = a.top_ids() if isinstance(a, DLAResult) else list(a)
    ib = b.top_ids() if isinstance(b, DLAResult) else list(b)
    k = k or min(len(ia), len(ib))
    return len(set(ia[:k]) & set(ib[:k]))
