"""The corpus texts a whitened teacher's Gaussian is fitted on, when it has no saved one
(its own module so that the teacher stages and the [whiten] stage share it without a cycle)."""

from __future__ import annotations

from typing import Any

from ..interpret.corpus import load_corpus

WHITEN_TEXTS = 100  # corpus texts a whitened teacher's Gaussian is fitted on


def teacher_whiten_texts(t: Any) -> list[str] | None:
    """Corpus texts for a TeacherConfig with coeff_units "whitened" and no saved Gaussian
    (build_teacher's whiten_texts); None otherwise."""
    if t is None or getattr(t, "coeff_units", "l2") != "whitened" or t.whiten is not None:
        return None
    return load_corpus(n=WHITEN_TEXTS).texts
