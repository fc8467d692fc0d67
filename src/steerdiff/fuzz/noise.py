"""Gaussian noise added to activations at chosen hooks (the mechanism of steerdiff.fuzz).

    with noise(lm, ["blocks.10.hook_resid_post"], scale=0.5, seed=0):
        ...                                       # every forward pass inside is fuzzed

For an activation h [d] at each position,

    isotropic: h + scale * (|h| / sqrt(d)) * z,  z ~ N(0, I)     scale relative to the token's
               own RMS per coordinate (so one scale means the same at every layer)
    whitened:  h + scale * L z,  L L^T = cov of a steerdiff.whiten.Gaussian at that hook,
               i.e. noise ~ N(0, scale^2 cov): scale in the data's standard deviations,
               shaped like the data (it stays near the activation manifold)

Noise is drawn from a seeded generator (the same seed gives the same noise), scale 0 leaves
the activations exactly as they are, and the hooks are removed when the block ends, also
after an exception (the one mechanism that replaces activations: sae.splice.
replace_activations).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import SteerdiffError
from ..models import LoadedModel, unwrap
from ..sae.splice import replace_activations
from ..whiten import Gaussian, WhitenError


class FuzzError(SteerdiffError, ValueError):
    """Bad fuzzing settings; the message names the option and the fix."""


def _noise_fn(scale: float, gen: torch.Generator, g: Gaussian | None):
    chol = None if g is None else torch.linalg.cholesky(g.cov).float()

    def fn(h: torch.Tensor) -> torch.Tensor:
        if scale == 0.0:
            return h
        z = torch.randn(h.shape, generator=gen, dtype=torch.float32).to(h.device)
        if chol is None:
            rms = h.float().norm(dim=-1, keepdim=True) / math.sqrt(h.shape[-1])
            return (h.float() + scale * rms * z).to(h.dtype)
        return (h.float() + scale * (z @ chol.to(h.device).T)).to(h.dtype)

    return fn


@contextmanager
def noise(
    model: nn.Module | LoadedModel,
    hooks: Sequence[str],
    scale: float,
    seed: int = 0,
    gaussians: Mapping[str, Gaussian] | None = None,
) -> Iterator[None]:
    """Fuzz `hooks` inside the block: isotropic noise, or whitened by `gaussians[hook]` for
    every hook when `gaussians` is given (each fitted at its hook: steerdiff.whiten)."""
    if not math.isfinite(scale) or scale < 0:
        raise FuzzError(f"scale must be a finite number >= 0 (got {scale}); 0 means no noise.")
    if gaussians is not None:
        for h in hooks:
            if h not in gaussians:
                raise FuzzError(f"Whitened noise at {h} needs a Gaussian fitted there: give one.")
            if gaussians[h].hook != h:
                raise WhitenError(
                    f"The Gaussian given for {h} was fitted at {gaussians[h].hook}: fit one at {h}."
                )
    gen = torch.Generator().manual_seed(seed)
    fns = {h: _noise_fn(scale, gen, None if gaussians is None else gaussians[h]) for h in hooks}
    with replace_activations(unwrap(model), fns):
        yield
