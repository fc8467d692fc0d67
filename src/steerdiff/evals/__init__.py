"""Trait evaluations (preference; others to come)."""

from .preference import (
    Category,
    CategoryError,
    PreferenceResult,
    Steering,
    exact_preference,
    load_category,
    sample_preference,
)

__all__ = [
    "Category",
    "CategoryError",
    "PreferenceResult",
    "Steering",
    "exact_preference",
    "load_category",
    "sample_preference",
]
