"""Sparse autoencoders (SAEs): read the formats researchers publish, write SAELens folders.

    from steerdiff.sae import load_sae, save_sae
    sae = load_sae("path/to/folder", lm)   # SAELens, Gemma Scope params.npz, sparsify; or hf:ORG/REPO/FOLDER
    z = sae.encode(acts); x_hat = sae.decode(z); d = sae.latent(123)

core.py: the SAE (weights, encode/decode, shape and model checks); formats.py: the file
formats (load_sae, save_sae); hub.py: "hf:" ids. Training lives in steerdiff.fit.sae_train,
reading vectors in latent space in steerdiff.interpret (sae_decompose, sae_effects).
"""

from .core import ACTIVATIONS, SAE, Activation, SAEError, check_fits, check_shapes
from .formats import detect_format, load_sae, save_sae

__all__ = [
    "ACTIVATIONS",
    "SAE",
    "Activation",
    "SAEError",
    "check_fits",
    "check_shapes",
    "detect_format",
    "load_sae",
    "save_sae",
]
