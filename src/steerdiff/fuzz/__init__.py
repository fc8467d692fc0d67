"""Activation fuzzing (issue 16): Gaussian noise of increasing scale at chosen hooks, an eval
vs the scale for two model variants, and which of the two is more readily pushed into the
behaviour.

    noise        the noise context manager (isotropic or whitened)         fuzz.noise
    fuzz_curve   one variant's eval at every (scale, seed), per question   fuzz.curve
    compare      A vs B: paired differences with bootstrap CIs, a verdict  fuzz.curve
    resolve_variant  "base" / VectorSet@coeff / adapter / model folder     fuzz.variants
    run_fuzz     curves for several variants, resumable, and their pairs   fuzz.run
"""

from .config import FuzzConfig
from .curve import EVALS, NO_DIFFERENCE, FuzzCurve, FuzzEval, compare, fuzz_curve, make_eval
from .noise import FuzzError, noise
from .run import fuzz_hooks, load_gaussians, run_fuzz
from .variants import ModelSpecError, Variant, resolve_variant

__all__ = [
    "EVALS",
    "NO_DIFFERENCE",
    "FuzzConfig",
    "FuzzCurve",
    "FuzzError",
    "FuzzEval",
    "ModelSpecError",
    "Variant",
    "compare",
    "fuzz_curve",
    "make_eval",
    "noise",
    "fuzz_hooks",
    "load_gaussians",
    "resolve_variant",
    "run_fuzz",
]
