"""Trait evaluations: the preference scorers, belief in false facts, the cached scoring
passes they run on, and the same scores by partial forwards for sweeps."""

from .beliefs import (
    BeliefRecord,
    BeliefResult,
    BeliefsError,
    evaluate_beliefs,
    paired_beliefs,
)
from .fast_scoring import CachedPrompts, FastCoherence, FastScorer
from .preference import (
    Category,
    CategoryError,
    PreferenceResult,
    answer_hits,
    evaluate_preference,
    exact_preference,
    load_category,
    paired_difference,
    sample_answers,
    sample_preference,
)
from .scoring import (
    CoherenceProbe,
    PromptCache,
    ScoringError,
    answer_variants,
    candidate_logprobs,
    continue_forward,
    prefix_forward,
    question_prompts,
)
from .stats import SpearmanResult, StatsError, bootstrap_ci, ratio_ci, spearman, spearman_ci
from .steering import Steering, SteeringError

__all__ = [
    "BeliefRecord",
    "BeliefResult",
    "BeliefsError",
    "CachedPrompts",
    "Category",
    "CategoryError",
    "CoherenceProbe",
    "FastCoherence",
    "FastScorer",
    "PreferenceResult",
    "PromptCache",
    "ScoringError",
    "SpearmanResult",
    "StatsError",
    "Steering",
    "SteeringError",
    "answer_hits",
    "answer_variants",
    "bootstrap_ci",
    "candidate_logprobs",
    "continue_forward",
    "evaluate_beliefs",
    "evaluate_preference",
    "exact_preference",
    "load_category",
    "paired_beliefs",
    "paired_difference",
    "prefix_forward",
    "question_prompts",
    "ratio_ci",
    "sample_answers",
    "sample_preference",
    "spearman",
    "spearman_ci",
]
