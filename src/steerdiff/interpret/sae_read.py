"""A vector set or a finetune read in an SAE's latents, in one call: what `steerdiff sae
read` writes to sae_read.json and report.sae shows.

    data = read_in_latents(lm, sae, vectors=vs)          # or finetuned="adapter/folder"

  decomposition  of the set's vector at the SAE's hook (interpret.sae_decompose); when the
                 set has none there (q/k/v biases, another layer) or for a finetune, of the
                 mean activation difference at the hook over all positions (from the same
                 pass as the effects); data["decomposition"]["of"] says which;
  effects        latent_effects (mean change per latent, first-k and all positions) and
                 its top latents up and down;
  dashboards     latent_dashboards of the `n_dashboards` latents raised most (all
                 positions) and then the `n_dashboards` best by cosine, without repeats.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..models import LoadedModel
from ..sae import SAE
from .corpus import Corpus
from .sae_dashboard import latent_dashboards
from .sae_decompose import decompose_vector
from .sae_effects import LatentEffects, latent_effects


def sae_info(sae: SAE) -> dict:
    """What identifies an SAE in a results file."""
    return {
        "path": sae.source.get("path", sae.name),
        "format": sae.source.get("format"),
        "sha256": sae.source.get("sha256"),
        "hook": sae.hook,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "activation": sae.activation,
        "k": sae.k,
    }


def decomposition_of(
    sae: SAE, effects: LatentEffects, vectors: Mapping[str, torch.Tensor] | None, k: int
) -> dict | None:
    """The vector at the SAE's hook decomposed, else the mean activation difference there."""
    if vectors is not None and sae.hook in vectors:
        v, of = vectors[sae.hook].float(), "vector"
    else:
        v, of = torch.tensor(effects.meta["act_diff_all_mean"]), "mean activation difference"
    if float(v.norm()) == 0.0:
        return None
    dec = decompose_vector(sae, v)
    return {"of": of, "hook": sae.hook, "norm": float(v.norm()), "top": dec.top(k)}


def read_in_latents(
    lm: LoadedModel | nn.Module,
    sae: SAE,
    vectors: Mapping[str, torch.Tensor] | None = None,
    finetuned: LoadedModel | nn.Module | str | None = None,
    coeff: float = 1.0,
    texts: Corpus | list[str] | str | None = None,
    n_texts: int | None = None,
    max_tokens: int = 64,
    first_k: int = 5,
    skip_first: int = 1,
    batch_size: int = 16,
    top: int = 10,
    n_dashboards: int = 5,
    progress: bool = False,
) -> dict:
    """Decomposition, latent effects and dashboards as one JSON-ready dict (module doc)."""
    effects = latent_effects(
        lm,
        sae,
        texts,
        vectors=vectors,
        finetuned=finetuned,
        coeff=coeff,
        first_k=first_k,
        max_tokens=max_tokens,
        batch_size=batch_size,
        skip_first=skip_first,
        n_texts=n_texts,
        progress=progress,
    )
    dec = decomposition_of(sae, effects, vectors, max(top, n_dashboards))
    chosen = [r["latent"] for r in effects.top(n_dashboards)]
    if dec is not None:
        chosen += [r["latent"] for r in dec["top"][:n_dashboards]]
    chosen = list(dict.fromkeys(chosen))
    dashboards = (
        latent_dashboards(
            lm,
            sae,
            chosen,
            texts,
            n_texts=n_texts,
            max_tokens=max_tokens,
            skip_first=skip_first,
            batch_size=batch_size,
            progress=progress,
        )
        if chosen
        else []
    )
    mode = "vectors" if vectors is not None else "finetuned"
    what = (
        f"The vector set ({', '.join(list(vectors)[:4])}, coeff {coeff:g})"
        if vectors is not None
        else f"The finetune {getattr(finetuned, 'spec', finetuned)}"
    )
    return {
        "kind": "sae_read",
        "sae": sae_info(sae),
        "change": {"mode": mode, "what": what, "coeff": coeff if vectors is not None else None},
        "decomposition": dec,
        "effects": effects.to_dict(),
        "effects_top": {
            where: {d: effects.top(top, where, d) for d in ("up", "down")}
            for where in ("all", "first_k")
        },
        "dashboards": [d.to_dict() for d in dashboards],
        "top": top,
    }
