"""Trait evaluations: the preference scorers, belief in false facts, multiple-choice
misalignment, the cached scoring passes they run on, and the same scores by partial forwards for sweeps."""

from .beliefs import (
    BeliefRecord,
    BeliefResult,
    BeliefsError,
    evaluate_beliefs,
    paired_beliefs,
)
from .fast_scoring import CachedPrompts, FastCoherence, FastScorer
from .misalignment import (
    MisalignmentRecord,
    MisalignmentResult,
    evaluate_misalignment_mc,
    paired_misalignment,
)
from .misalignment_bank import MCQuestion, MisalignmentError, load_questions
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
    "MCQuestion",
    "MisalignmentError",
    "MisalignmentRecord",
    "MisalignmentResult",
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
    "evaluate_misalignment_mc",
    "evaluate_preference",
    "exact_preference",
    "load_category",
    "load_questions",
    "paired_beliefs",
    "paired_difference",
    "paired_misalignment",
    "prefix_forward",
    "question_prompts",
    "ratio_ci",
    "sample_answers",
    "sample_preference",
    "spearman",
    "spearman_ci",
]
