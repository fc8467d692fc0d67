"""Read vectors: direct logit attribution, the activation-difference lens, similarity, monitoring,
token entanglement."""

from .batching import padded_batches, tokenize_texts
from .corpus import Corpus, CorpusError, load_corpus
from .dla import (
    DLAError,
    DLAResult,
    check_dla_hook,
    direct_logit_attribution,
    dla_scores,
    dla_table,
    logit_basis,
    overlap,
)
from .entanglement import (
    EntanglementError,
    EntanglementResult,
    FrequencyShift,
    frequency_shift,
    number_logprobs,
    token_entanglement,
)
from .lens import LensError, activation_difference_lens
from .lens_readout import LensReadout, LensResult, LensRow, save_lens
from .monitor import MonitorError, MonitorResult, project, save_monitor
from .planted_check import compare_to_planted, planted_check
from .similarity import (
    SimilarityError,
    SimMatrix,
    cosine_matrices,
    cross_cosine,
    effect_correlation,
    effect_vectors,
    pairwise_mean_cosine,
)
from .subliminal import (
    EntanglementReport,
    SubliminalResult,
    number_system_prompt,
    subliminal_prompting,
)

__all__ = [
    "Corpus",
    "CorpusError",
    "DLAError",
    "DLAResult",
    "EntanglementError",
    "EntanglementReport",
    "EntanglementResult",
    "FrequencyShift",
    "SubliminalResult",
    "LensError",
    "LensReadout",
    "LensResult",
    "LensRow",
    "MonitorError",
    "MonitorResult",
    "SimMatrix",
    "SimilarityError",
    "activation_difference_lens",
    "compare_to_planted",
    "pairwise_mean_cosine",
    "planted_check",
    "check_dla_hook",
    "cosine_matrices",
    "cross_cosine",
    "direct_logit_attribution",
    "dla_scores",
    "dla_table",
    "effect_correlation",
    "effect_vectors",
    "frequency_shift",
    "load_corpus",
    "logit_basis",
    "number_logprobs",
    "number_system_prompt",
    "overlap",
    "padded_batches",
    "project",
    "save_lens",
    "save_monitor",
    "subliminal_prompting",
    "token_entanglement",
    "tokenize_texts",
]
