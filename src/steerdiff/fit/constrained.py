"""Scoring a fit's data under the decoding constraint that produced it (fit.data uses this).

A numbers dataset decoded under a constraint (token set + list grammar) records it in its
manifest (`constraint`, a generate.constraint.DecodingConstraint spec). The teacher "said"
its distribution renormalised over what the constraint allowed at each step, so base,
teacher and student are scored the same way: each Example gets the allowed ids at each
completion token (`add_allowed`), and a Batch the same as padded [n, m] tensors
(`collate_allowed`), which fit.losses.constrain renormalises over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..generate import DatasetError
from ..generate.constraint import ConstraintSteps, DecodingConstraint
from .config import FitError


def pad_topk(
    ids: list[list[int]], logprobs: list[list[float]]
) -> tuple[list[list[int]], list[list[float]]]:
    """Top-k lists of unequal length (a constrained step allowed fewer than k tokens) padded
    to the longest: id 0 with log-prob -inf, which the losses treat as no candidate."""
    k = max((len(r) for r in ids), default=0)
    if all(len(r) == k for r in ids):
        return ids, logprobs
    pad = float("-inf")
    return (
        [list(r) + [0] * (k - len(r)) for r in ids],
        [list(r) + [pad] * (k - len(r)) for r in logprobs],
    )


def data_constraint(
    manifest: dict, tokenizer: Any, source: str, notes: list[str]
) -> ConstraintSteps | None:
    """The manifest's decoding constraint, rebuilt for `tokenizer` (None: the data was
    sampled unconstrained, or its manifest predates the recorded spec: a note says so)."""
    spec = manifest.get("constraint")
    if isinstance(spec, dict):
        try:
            return DecodingConstraint.from_spec(spec, f"{source}'s manifest").stepper(tokenizer)
        except DatasetError as e:
            raise FitError(str(e)) from None
    if spec or manifest.get("constrained"):
        notes.append(
            f"{source} was decoded under a constraint, but its manifest (an older steerdiff's) "
            "does not record it: base, teacher and student are scored unconstrained; "
            "regenerate the data to score them under the constraint"
        )
    return None


def add_allowed(examples: list[Any], steps: ConstraintSteps, where: Callable[[int], str]) -> None:
    """Fill each Example's `allowed` (the ids the constraint allowed at each completion
    token); FitError naming the row when a completion token is not among them (the rows
    were not decoded under this constraint)."""
    for i, ex in enumerate(examples):
        ex.allowed = steps.allowed_steps(ex.completion_ids)
        for t, (tok, ok) in enumerate(zip(ex.completion_ids, ex.allowed, strict=True)):
            if tok not in ok:
                raise FitError(
                    f"{where(i)}: completion token {t} (id {tok}) is not one the "
                    "manifest's decoding constraint allows there, so the row was not "
                    "decoded under it; fix the manifest's 'constraint', or fit with "
                    "constrained_scoring=False (--no-constrained-scoring)."
                )


def collate_allowed(
    examples: Sequence[Any],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The examples' allowed ids at each loss token (row-major, like `targets`) as [n, m]
    ids padded with each position's first id, and the [n, m] mask of real entries; (None,
    None) unless every example carries them."""
    if not examples or any(ex.allowed is None for ex in examples):
        return None, None
    steps = [a for ex in examples for a in ex.trained(ex.allowed)]  # (Example.loss_mask)
    m = max(len(a) for a in steps)
    ids = torch.tensor([a + [a[0]] * (m - len(a)) for a in steps], dtype=torch.long)
    mask = torch.tensor([[True] * len(a) + [False] * (m - len(a)) for a in steps])
    return ids, mask
