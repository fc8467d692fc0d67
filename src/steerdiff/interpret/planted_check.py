"""The planted-vector check: does a vector fitted on a steered teacher's data find the
teacher's own vector v*?

The steered teacher is the model plus a known vector v* at one hook. A vector fitted at
that hook on the teacher's data should point the same way (cosine near 1), have a
similar norm, and promote the same tokens (overlap of the top-k direct-logit-attribution
tokens, centred and raw).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..models import LoadedModel
from .dla import direct_logit_attribution, overlap


def compare_to_planted(
    lm: LoadedModel, hook: str, v: torch.Tensor, v_star: torch.Tensor, k: int = 20
) -> dict[str, float | int]:
    """Cosine, norm ratio |v| / |v*| and top-k DLA overlap of v against v*, both [d_model]."""
    row: dict[str, float | int] = {
        "cosine": float(torch.nn.functional.cosine_similarity(v, v_star, dim=0)),
        "norm_ratio": float(v.norm() / v_star.norm()),
    }
    for center in (True, False):
        a = direct_logit_attribution(lm, {hook: v}, k=k, center=center)
        b = direct_logit_attribution(lm, {hook: v_star}, k=k, center=center)
        row[f"dla_top{k}_overlap_" + ("centred" if center else "raw")] = overlap(a, b)
    return row


def planted_check(
    lm: LoadedModel,
    hook: str,
    v_star: torch.Tensor,
    fitted: Mapping[str, Mapping[str, torch.Tensor]],
    k: int = 20,
) -> list[dict]:
    """One row per fitted set that has a vector at `hook`: {"fit", "hook", "cosine",
    "norm_ratio", "dla_top{k}_overlap_centred", "dla_top{k}_overlap_raw"}.

    v_star: the planted vector [d_model] (the teacher's vector times its coefficient).
    fitted: name -> vector set (e.g. a VectorSet per fit and seed).
    """
    return [
        {"fit": name, "hook": hook, **compare_to_planted(lm, hook, vs[hook], v_star, k)}
        for name, vs in fitted.items()
        if hook in vs
    ]
