"""Constrained decoding for the numbers task: which tokens may be sampled, and in what order.

`allowed_token_ids` is the token set (digits and separators only); `NumberListGrammar`
narrows it per row and step so every completion stays a list the task's filter accepts.
Both are passed to `generate.sample(allowed_ids=..., grammar=...)` by `numbers.make_dataset`,
which records the `DecodingConstraint` spec in the manifest so a fit can rebuild the same
per-step allowed sets. They live in `generate.constraint` (below fit, which scores under
them); this module names them for the task.
"""

from __future__ import annotations

from ..generate.constraint import (
    ALLOWED_CHARS,
    SEPARATORS,
    ConstraintSteps,
    DecodingConstraint,
    NumberListGrammar,
    allowed_token_ids,
    grammar_mask,
)

__all__ = [
    "ALLOWED_CHARS",
    "SEPARATORS",
    "ConstraintSteps",
    "DecodingConstraint",
    "NumberListGrammar",
    "allowed_token_ids",
    "grammar_mask",
]
