"""Read vectors: direct logit attribution, the activation-difference lens, similarity, monitoring."""

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
from .lens import LensError, LensReadout, LensResult, activation_difference_lens, save_lens
from .monitor import MonitorError, MonitorResult, project, save_monitor
from .similarity import SimMatrix, cosine_matrices, cross_cosine, effect_correlation, effect_vectors

__all__ = [
    "Corpus",
    "CorpusError",
    "DLAError",
    "DLAResult",
    "LensError",
    "LensReadout",
    "LensResult",
    "MonitorError",
    "MonitorResult",
    "SimMatrix",
    "activation_difference_lens",
    "check_dla_hook",
    "cosine_matrices",
    "cross_cosine",
    "direct_logit_attribution",
    "dla_scores",
    "dla_table",
    "effect_correlation",
    "effect_vectors",
    "load_corpus",
    "logit_basis",
    "overlap",
    "project",
    "save_lens",
    "save_monitor",
]
