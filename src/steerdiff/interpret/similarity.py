"""Similarity between vectors: cosine per hook, across hooks/layers, and of effects.

Vectors at different hook points (e.g. q biases vs residual vectors) live in different
spaces and cannot be compared by cosine; compare their *effects* instead: the Pearson
correlation over the vocabulary of their mean final-logit differences on a corpus
(`effect_vectors` + `effect_correlation`), or of their centred DLA scores.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SteerdiffError
from ..models import LoadedModel
from ..vectors import VectorSetError


class SimilarityError(SteerdiffError, ValueError):
    """Effects or vector sets that cannot be compared; the message says why."""


@dataclass
class SimMatrix:
    """A labelled matrix [len(rows), len(cols)]."""

    rows: list[str]
    cols: list[str]
    values: torch.Tensor  # [rows, cols]
    title: str = ""

    def to_dict(self) -> dict:
        return {
            "title": self.title,
            "rows": self.rows,
            "cols": self.cols,
            "values": self.values.tolist(),
        }

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([""] + self.cols)
        for r, vals in zip(self.rows, self.values.tolist(), strict=False):
            w.writerow([r] + [f"{v:.4f}" for v in vals])
        return buf.getvalue()


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between rows: a [n, d], b [m, d] -> [n, m]."""
    a = a.float() / a.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b.float() / b.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def cosine_matrices(
    sets: Mapping[str, Mapping[str, torch.Tensor]], hooks: list[str] | None = None
) -> dict[str, SimMatrix]:
    """For each hook present in every set: the [n_sets, n_sets] cosine matrix between sets
    (e.g. seeds). sets: label -> VectorSet."""
    if len(sets) < 2:
        raise VectorSetError("Give at least two vector sets to compare.")
    labels = list(sets)
    common = [h for h in next(iter(sets.values())) if all(h in s for s in sets.values())]
    if hooks is not None:
        missing = [h for h in hooks if h not in common]
        if missing:
            raise VectorSetError(f"Hooks not in every set: {missing[:5]}")
        common = hooks
    if not common:
        raise VectorSetError("The vector sets share no hook points; compare their effects instead.")
    out = {}
    for h in common:
        dims = {tuple(sets[lab][h].shape) for lab in labels}
        if len(dims) != 1:
            raise VectorSetError(f"Vectors at {h} have different shapes across sets: {dims}")
        m = torch.stack([sets[lab][h].detach().float().cpu() for lab in labels])  # [n, d]
        out[h] = SimMatrix(labels, labels, _cos(m, m), f"cosine at {h}")
    return out


def cross_cosine(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor] | torch.Tensor, title: str = ""
) -> SimMatrix:
    """Cosine of every vector of `a` with every vector of `b` of the same width.

    E.g. a fitted set (rows: its hooks) against per-layer contrast vectors (cols: layers),
    or against one contrast vector (a tensor [d]). Pairs of different widths are NaN.
    """
    bm = {"vector": b} if isinstance(b, torch.Tensor) else dict(b)
    rows, cols = list(a), list(bm)
    vals = torch.full((len(rows), len(cols)), float("nan"))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            va, vb = a[r].detach().float().cpu(), bm[c].detach().float().cpu()
            if va.shape == vb.shape:
                vals[i, j] = _cos(va[None], vb[None])[0, 0]
    if torch.isnan(vals).all():
        raise VectorSetError("No pair of vectors has the same width; nothing to compare by cosine.")
    return SimMatrix(rows, cols, vals, title or "cosine (rows: a, cols: b)")


def effect_correlation(effects: Mapping[str, torch.Tensor], title: str = "") -> SimMatrix:
    """Pearson correlation between effect vectors over the vocabulary.

    effects: label -> [vocab] (mean final-logit differences, or centred DLA scores).
    """
    if len(effects) < 2:
        raise SimilarityError("Give at least two effects to correlate.")
    labels = list(effects)
    shapes = {tuple(e.shape) for e in effects.values()}
    if len(shapes) != 1:
        raise SimilarityError(f"Effects have different shapes: {shapes} (same model needed).")
    m = torch.stack([effects[k].detach().double().cpu().flatten() for k in labels])  # [n, vocab]
    m = m - m.mean(dim=1, keepdim=True)
    corr = _cos(m, m)
    return SimMatrix(labels, labels, corr.float(), title or "correlation of mean logit differences")


def effect_vectors(
    model: LoadedModel | nn.Module,
    sets: Mapping[str, Mapping[str, torch.Tensor]],
    texts=None,
    position: str = "all",
    **lens_kwargs,
) -> dict[str, torch.Tensor]:
    """Mean final-logit difference [vocab] of each set on a corpus (via the lens).

    position: "all" (all real positions) or "0".."k-1" (one of the first positions).
    Only the final logits are needed, so the lens records one cheap hook.
    """
    from .lens import activation_difference_lens

    hooks = lens_kwargs.pop("hooks", "blocks.0.hook_resid_pre")
    out = {}
    for label, vs in sets.items():
        res = activation_difference_lens(model, texts, vectors=vs, hooks=hooks, **lens_kwargs)
        lp, la = res.logit_diff(model)
        out[label] = la if position == "all" else lp[int(position)]
    return out


def pairwise_mean_cosine(sets: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """For every pair of vector sets that share a hook: the mean over shared hooks of the
    cosine between their vectors, keyed "a vs b" (a before b in the mapping's order).

    Used to ask whether fits with other seeds (or a teacher's vector) found the same
    directions: 1 = the same direction at every shared hook, 0 = unrelated."""
    names = list(sets)
    out: dict[str, float] = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = [h for h in sets[a] if h in sets[b]]
            if not common:
                continue
            cos = [
                float(torch.cosine_similarity(sets[a][h].float(), sets[b][h].float(), dim=0))
                for h in common
            ]
            out[f"{a} vs {b}"] = sum(cos) / len(cos)
    return out
