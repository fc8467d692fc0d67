"""MELBO: unsupervised steering vectors (issue 16), after Mack & Turner (2024),
"Mechanistically Eliciting Latent Behaviors in Language Models" (AI Alignment Forum;
github.com/amack315/unsupervised-steering-vectors).

    config.py  MelboConfig (`steerdiff melbo` options, the [melbo] table), the eval names
    train.py   train_melbo: N orthogonal vectors of norm R at a source hook that maximise
               the change of a target hook's activations (the published objective)
    store.py   MelboResult; one VectorSet file per vector, resumable per vector
    sweep.py   radius_sweep: activation change vs R, trained vs random (the plateau)
    evals.py   each vector's samples and evals (preference, misalignment, coherence),
               ranked; planted_recovery: cosines with a planted vector vs chance
"""

from .config import EVALS, MelboConfig, MelboError, parse_evals
from .store import MelboResult
from .train import TargetMap, train_melbo

__all__ = [
    "EVALS",
    "MelboConfig",
    "MelboError",
    "MelboResult",
    "TargetMap",
    "parse_evals",
    "train_melbo",
]
