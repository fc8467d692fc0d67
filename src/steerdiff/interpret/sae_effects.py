"""The latent-level effect of a vector or a finetune: how much each SAE latent's activation
changes on real text.

Run the base model and the changed one (a VectorSet added with `coeff` at every real
token, or a finetune: another model or a PEFT adapter folder) on corpus texts, encode the
activations at the SAE's hook with the SAE, and average

    change = encode(changed) - encode(base)          [B, L, d_sae] per batch

  (a) per position, for positions 0..first_k-1 (pos_mean [first_k, d_sae]), and
  (b) over all real (non-padding) positions from `skip_first` on (all_mean [d_sae]);
      default skip_first=1: the first token's activations are massive in most models.

The batching, the steering (the blocks below the vectors run once, steerdiff.replay) and
the finetune contexts are the activation-difference lens' (interpret.lens): this module
only says what is averaged at the hook (`difference=`): the SAE's change, its base
activations, and the raw activation difference (kept in meta["act_diff_all_mean"], so a
change without a vector at the SAE's hook, e.g. q/k/v biases or a LoRA, can be decomposed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..hookpoints import HOOK_SUFFIXES
from ..hooks import get_hook_point
from ..models import LoadedModel, unwrap
from ..sae import SAE, SAEError, check_fits
from .corpus import Corpus
from .lens import LensError, activation_difference_lens

Where = Literal["all", "first_k"] | int


@dataclass
class LatentEffects:
    """Mean change (changed - base) of each latent's activation at one SAE's hook."""

    hook: str
    first_k: int
    pos_mean: torch.Tensor  # [first_k, d_sae] mean change at positions 0..first_k-1
    all_mean: torch.Tensor  # [d_sae] mean change over all real positions (from skip_first)
    base_all_mean: torch.Tensor  # [d_sae] mean base activation over the same positions
    n_tokens: int
    n_texts: int
    meta: dict = field(default_factory=dict)

    def scores(self, where: Where = "all") -> torch.Tensor:
        """The change [d_sae] that `top`/`rank` order by: "all" positions, "first_k" (the
        mean of the per-position means 0..first_k-1), or one position p (an int)."""
        if where == "all":
            return self.all_mean
        if where == "first_k":
            return self.pos_mean.mean(0)
        if isinstance(where, int) and 0 <= where < self.first_k:
            return self.pos_mean[where]
        raise SAEError(f"where={where!r}: use 'all', 'first_k' or a position 0-{self.first_k - 1}.")

    def top(
        self, k: int = 10, where: Where = "all", direction: Literal["up", "down"] = "up"
    ) -> list[dict]:
        """The k latents with the biggest increase (up) or decrease (down), biggest first:
        [{"latent", "change", "base"}] (base: the latent's mean base activation)."""
        if direction not in ("up", "down"):
            raise SAEError(f"direction={direction!r}: use 'up' or 'down'.")
        s = self.scores(where)
        sign = 1.0 if direction == "up" else -1.0
        idx = torch.topk(sign * s, min(k, s.numel())).indices.tolist()
        return [
            {"latent": i, "change": float(s[i]), "base": float(self.base_all_mean[i])} for i in idx
        ]

    def rank(self, latent: int, where: Where = "all") -> int:
        """1-based rank of `latent` by increase (1 = the biggest increase)."""
        s = self.scores(where)
        return int((s > s[latent]).sum()) + 1

    def to_dict(self) -> dict:
        return {
            "hook": self.hook,
            "first_k": self.first_k,
            "pos_mean": self.pos_mean.tolist(),
            "all_mean": self.all_mean.tolist(),
            "base_all_mean": self.base_all_mean.tolist(),
            "n_tokens": self.n_tokens,
            "n_texts": self.n_texts,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LatentEffects:
        return cls(
            hook=d["hook"],
            first_k=int(d["first_k"]),
            pos_mean=torch.tensor(d["pos_mean"], dtype=torch.float32),
            all_mean=torch.tensor(d["all_mean"], dtype=torch.float32),
            base_all_mean=torch.tensor(d["base_all_mean"], dtype=torch.float32),
            n_tokens=int(d["n_tokens"]),
            n_texts=int(d["n_texts"]),
            meta=dict(d.get("meta", {})),
        )


def check_reaches(model: LoadedModel | nn.Module, vectors: Mapping[str, Any], hook: str) -> None:
    """One-line SAEError when every vector sits after `hook` (so nothing changes there)."""
    hf = unwrap(model)
    at = get_hook_point(hf, hook)
    order = HOOK_SUFFIXES.index(at.suffix)
    for name in vectors:
        hp = get_hook_point(hf, name)
        if (hp.layer, HOOK_SUFFIXES.index(hp.suffix)) <= (at.layer, order):
            return
    raise SAEError(
        f"Every vector of the set ({', '.join(list(vectors)[:4])}) is after the SAE's hook "
        f"{hook}, so it changes nothing there: use an SAE at or after the vectors' hooks."
    )


def sae_on(sae: SAE, device: torch.device) -> SAE:
    """The SAE with its tensors on `device` (itself when they are there already)."""
    if sae.W_enc.device == device:
        return sae
    moved = {
        f.name: getattr(sae, f.name).to(device)
        for f in dataclasses.fields(sae)
        if isinstance(getattr(sae, f.name), torch.Tensor)
    }
    return dataclasses.replace(sae, **moved)


def latent_effects(
    lm: LoadedModel | nn.Module,
    sae: SAE,
    texts: Corpus | list[str] | str | None = None,
    vectors: Mapping[str, torch.Tensor] | None = None,
    finetuned: LoadedModel | nn.Module | str | None = None,
    coeff: float = 1.0,
    first_k: int = 5,
    max_tokens: int = 64,
    batch_size: int = 16,
    skip_first: int = 1,
    n_texts: int | None = None,
    progress: bool = False,
) -> LatentEffects:
    """Mean change of every latent of `sae` (changed - base) over `texts`.

    Exactly one of vectors (a VectorSet / dict, added with `coeff` at every real token) or
    finetuned (a model, a model spec, or a PEFT adapter folder for `lm`). texts: a Corpus,
    a list of strings or a corpus spec (None = the offline default corpus); n_texts: take
    this many (seeded). first_k, max_tokens, batch_size, skip_first: as the lens'.
    """
    if (vectors is None) == (finetuned is None):
        raise LensError(
            "Give exactly one of vectors=... (a VectorSet) or finetuned=... (a model or a "
            "PEFT adapter folder) to read its latent effects."
        )
    check_fits(sae, lm)
    hook = str(sae.hook)
    if vectors is not None:
        check_reaches(lm, vectors, hook)
    enc_sae = sae_on(sae, next(unwrap(lm).parameters()).device)
    d_sae = sae.d_sae

    def difference(_hook: str, base: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
        z0, z1 = enc_sae.encode(base), enc_sae.encode(changed)  # [B, L, d_sae]
        raw = (changed - base).to(z0.dtype)  # [B, L, d_in]
        return torch.cat([z1 - z0, z0, raw], dim=-1)

    res = activation_difference_lens(
        lm,
        texts,
        vectors=vectors,
        finetuned=finetuned,
        hooks=[hook],
        coeff=coeff,
        first_k=first_k,
        max_tokens=max_tokens,
        batch_size=batch_size,
        skip_first=skip_first,
        n_texts=n_texts,
        progress=progress,
        difference=difference,
    )
    pos, allm = res.pos_mean[hook], res.all_mean[hook]  # [k, 2 d_sae + d_in], [same]
    meta = dict(res.meta)
    meta.update(
        sae=dict(sae.source),
        sae_hook=hook,
        pos_count=res.pos_count.tolist(),
        act_diff_all_mean=allm[2 * d_sae :].tolist(),
    )
    return LatentEffects(
        hook=hook,
        first_k=first_k,
        pos_mean=pos[:, :d_sae].clone(),
        all_mean=allm[:d_sae].clone(),
        base_all_mean=allm[d_sae : 2 * d_sae].clone(),
        n_tokens=res.n_tokens,
        n_texts=res.n_texts,
        meta=meta,
    )
