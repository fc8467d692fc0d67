"""A teacher whose coeff is in whitened units, as the pipeline stages see it: the corpus
texts its Gaussian is fitted on when it has no saved one, and its vector in those units (its
own module so the teacher, eval, read and [whiten] stages share it without an import cycle)."""

from __future__ import annotations

from typing import Any

from ..interpret.corpus import load_corpus
from ..models import LoadedModel
from ..teachers import whitened_teacher_vectors
from ..vectors import VectorSet

WHITEN_TEXTS = 100  # corpus texts a whitened teacher's Gaussian is fitted on


def teacher_whiten_texts(t: Any) -> list[str] | None:
    """Corpus texts for a TeacherConfig with coeff_units "whitened" and no saved Gaussian
    (build_teacher's whiten_texts); None otherwise."""
    if t is None or getattr(t, "coeff_units", "l2") != "whitened" or t.whiten is not None:
        return None
    return load_corpus(n=WHITEN_TEXTS).texts


def teacher_vectors_in_units(t: Any, lm: LoadedModel, vs: VectorSet | None) -> VectorSet | None:
    """The teacher vector the teacher's coeff multiplies: as saved for coeff_units "l2", at 1
    whitened unit per hook for "whitened" (the same Gaussian as the teacher that wrote the data)."""
    if vs is None or getattr(t, "coeff_units", "l2") != "whitened":
        return vs
    spec = {"coeff_units": "whitened", "whiten": t.whiten}
    return whitened_teacher_vectors(vs, lm, spec, texts=teacher_whiten_texts(t))
