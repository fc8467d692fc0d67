"""Whitening: a Gaussian fitted to a hook's activations, and distances measured in it.

Issue 16 (the steering toolbox) starts here. For activations x [d] at one hook on some text,

    mean  = E[x]                              [d]
    cov   = shrunk covariance of x            [d, d]   (Ledoit-Wolf by default, scikit-learn)
    ||v||_M = sqrt(v^T cov^-1 v)              Mahalanobis norm of a direction / difference v
    d_M(x)  = ||x - mean||_M                  how far an activation is from the data
    spread(v) = sqrt(u^T cov u), u = v / |v|  the data's standard deviation along v

`whitened_coeff(g, v, c)` is the coefficient that makes coeff * v exactly c in Mahalanobis
norm, i.e. "c standard deviations of the data, whitened", the unit the research notes
suggest for steering strength (a step that keeps activations on the data manifold).

A `Gaussian` records its hook and the model it was fitted on (spec and weights hash), and
`check_for(g, lm, hook)` refuses, in one line, one fitted at another hook or on another model.
Without shrinkage ("none") the Mahalanobis norm is exactly invariant to an invertible linear
map of the data (tested); Ledoit-Wolf shrinks towards a scaled identity, which trades that
invariance for a well-conditioned inverse when tokens are few relative to d.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .chat import encode
from .errors import SteerdiffError
from .hookpoints import hook_dim
from .io import atomic_path
from .models import LoadedModel, unwrap
from .progress import progress as progress_bar
from .replay import hook_activations

SHRINKAGE = ("ledoit-wolf", "none")


class WhitenError(SteerdiffError, ValueError):
    """A Gaussian that cannot be fitted, read, or used with this model / hook."""


@dataclass
class Gaussian:
    """Mean and (shrunk) covariance of one hook's activations, with what made them."""

    hook: str
    mean: torch.Tensor  # [d], float64
    cov: torch.Tensor  # [d, d], float64
    shrinkage: float = 0.0  # the weight on the scaled identity (Ledoit-Wolf's estimate)
    n_tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)  # model, weights hash, texts, ...

    def __post_init__(self) -> None:
        self.mean = self.mean.double()
        self.cov = self.cov.double()
        d = self.mean.numel()
        if self.cov.shape != (d, d):
            raise WhitenError(
                f"Gaussian at {self.hook}: cov is {tuple(self.cov.shape)} but mean is [{d}]."
            )
        try:
            self._chol = torch.linalg.cholesky(self.cov)
        except RuntimeError:
            raise WhitenError(
                f"The covariance at {self.hook} is singular ({self.n_tokens} tokens for "
                f"{d} dimensions): fit on more text, or use shrinkage='ledoit-wolf'."
            ) from None

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def _solve(self, v: torch.Tensor) -> torch.Tensor:
        """cov^-1 v for v [..., d] (via the Cholesky factor)."""
        flat = v.double().reshape(-1, self.dim).T  # [d, n]
        return torch.cholesky_solve(flat, self._chol).T.reshape(v.shape)

    def mahalanobis_norm(self, v: torch.Tensor) -> torch.Tensor:
        """sqrt(v^T cov^-1 v) of a direction or difference v [..., d] (no mean subtracted)."""
        v = _as_width(v, self.dim, self.hook).double()
        return (v * self._solve(v)).sum(-1).clamp_min(0).sqrt()

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of activations x [..., d] from the data's mean."""
        return self.mahalanobis_norm(_as_width(x, self.dim, self.hook).double() - self.mean)

    def spread(self, v: torch.Tensor) -> float:
        """The data's standard deviation along v: sqrt(u^T cov u), u = v / |v|."""
        u = _unit(_as_width(v, self.dim, self.hook).double())
        return math.sqrt(float(u @ self.cov @ u))

    def save(self, path: str | Path) -> Path:
        """One .safetensors file (mean, cov) with hook, shrinkage and provenance in its header."""
        from safetensors.torch import save_file

        path = Path(path)
        header = {
            "hook": self.hook,
            "shrinkage": str(self.shrinkage),
            "n_tokens": str(self.n_tokens),
            "meta": json.dumps(self.meta),
        }
        with atomic_path(path) as tmp:
            save_file({"mean": self.mean, "cov": self.cov}, str(tmp), metadata=header)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Gaussian:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise WhitenError(f"{path} does not exist: fit one with steerdiff.whiten.fit_gaussian.")
        try:
            with safe_open(str(path), "pt") as f:
                header = f.metadata() or {}
                mean, cov = f.get_tensor("mean"), f.get_tensor("cov")
            return cls(
                hook=header["hook"],
                mean=mean,
                cov=cov,
                shrinkage=float(header.get("shrinkage", 0.0)),
                n_tokens=int(header.get("n_tokens", 0)),
                meta=json.loads(header.get("meta", "{}")),
            )
        except WhitenError:
            raise
        except Exception as e:  # bad header, truncated file, missing tensors
            raise WhitenError(
                f"{path} is not a steerdiff Gaussian or is corrupt ({type(e).__name__}): "
                "fit it again with steerdiff.whiten.fit_gaussian."
            ) from None


def _as_width(v: torch.Tensor, d: int, hook: str) -> torch.Tensor:
    v = torch.as_tensor(v)
    if v.shape[-1] != d:
        raise WhitenError(
            f"A vector of width {v.shape[-1]} cannot be measured by the Gaussian at {hook} "
            f"(width {d}): use one fitted at the vector's hook."
        )
    return v


def _unit(v: torch.Tensor) -> torch.Tensor:
    n = float(v.norm())
    if n == 0.0:
        raise WhitenError("The vector is all zeros: it has no direction.")
    return v / n


def whitened_coeff(g: Gaussian, v: torch.Tensor, c: float) -> float:
    """The coefficient k with ||k v||_M = c (c in whitened units; its sign kept)."""
    norm = float(g.mahalanobis_norm(v))
    if norm == 0.0:
        raise WhitenError("The vector is all zeros: no coefficient gives it a whitened length.")
    return c / norm


def gaussian_from_activations(
    acts: torch.Tensor, hook: str, shrinkage: str | float = "ledoit-wolf", meta: dict | None = None
) -> Gaussian:
    """Fit a Gaussian to activations [n, d]: the mean, and the covariance shrunk towards a
    scaled identity by Ledoit-Wolf's estimate ("ledoit-wolf"), by a given weight (a float in
    [0, 1]), or not at all ("none": the maximum-likelihood covariance)."""
    x = acts.detach().double().cpu().numpy()
    if x.ndim != 2 or x.shape[0] < 2:
        raise WhitenError(
            f"Need activations [n >= 2, d] to fit a Gaussian at {hook}, got {x.shape}."
        )
    if shrinkage == "ledoit-wolf":
        from sklearn.covariance import LedoitWolf

        lw = LedoitWolf(assume_centered=False).fit(x)
        cov, weight = lw.covariance_, float(lw.shrinkage_)
    elif shrinkage == "none" or isinstance(shrinkage, (int, float)):
        xc = x - x.mean(0)
        emp = xc.T @ xc / x.shape[0]
        weight = 0.0 if shrinkage == "none" else float(shrinkage)
        if not 0.0 <= weight <= 1.0:
            raise WhitenError(f"shrinkage {shrinkage!r}: a weight must be in [0, 1].")
        mu = np.trace(emp) / emp.shape[0]
        cov = (1 - weight) * emp + weight * mu * np.eye(emp.shape[0])
    else:
        raise WhitenError(
            f"shrinkage {shrinkage!r}: use {', '.join(SHRINKAGE)} or a weight in [0, 1]."
        )
    return Gaussian(
        hook=hook,
        mean=torch.from_numpy(x.mean(0)),
        cov=torch.from_numpy(np.asarray(cov)),
        shrinkage=weight,
        n_tokens=x.shape[0],
        meta=dict(meta or {}),
    )


@torch.no_grad()
def fit_gaussians(
    lm: LoadedModel,
    hooks: Sequence[str],
    texts: Sequence[str],
    max_tokens: int = 64,
    skip_first: int = 1,
    shrinkage: str | float = "ledoit-wolf",
    progress: bool = False,
) -> dict[str, Gaussian]:
    """{hook: Gaussian} of each hook's activations over `texts`, from one pass per text
    (each truncated to max_tokens; its first `skip_first` positions, whose activations are
    massive in many models, left out). texts: e.g. interpret.corpus.load_corpus(n=200).texts."""
    hf = unwrap(lm)
    hooks = list(dict.fromkeys(hooks))
    for hook in hooks:
        hook_dim(hf, hook)  # an unknown hook fails here, in one line
    rows = [ids[:max_tokens] for ids in (encode(lm.tokenizer, t) for t in texts)]
    rows = [r for r in rows if len(r) > skip_first]
    if not rows:
        raise WhitenError(f"No text has more than {skip_first} tokens: give longer texts.")
    dev = next(hf.parameters()).device
    kept: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    with progress_bar(len(rows), f"whiten {', '.join(hooks)}", disable=not progress) as bar:
        for r in rows:  # one text per pass (no padding), stopping after the last hook's block
            acts = hook_activations(hf, hooks, torch.tensor([r], device=dev), skip_first=skip_first)
            for h in hooks:
                kept[h].append(acts[h])
            bar.update(1)
    meta = {
        "model": getattr(lm, "spec", None),
        "weights_hash": getattr(lm, "weights_hash", None),
        "n_texts": len(rows),
        "max_tokens": max_tokens,
        "skip_first": skip_first,
    }
    return {h: gaussian_from_activations(torch.cat(kept[h]), h, shrinkage, meta) for h in hooks}


def fit_gaussian(
    lm: LoadedModel,
    hook: str,
    texts: Sequence[str],
    max_tokens: int = 64,
    skip_first: int = 1,
    shrinkage: str | float = "ledoit-wolf",
    progress: bool = False,
) -> Gaussian:
    """A Gaussian of `hook`'s activations over `texts` (see fit_gaussians)."""
    return fit_gaussians(lm, [hook], texts, max_tokens, skip_first, shrinkage, progress)[hook]


def check_for(g: Gaussian, lm: LoadedModel, hook: str) -> None:
    """One-line WhitenError unless g was fitted at `hook` on this model (weights hash)."""
    if g.hook != hook:
        raise WhitenError(
            f"The Gaussian was fitted at {g.hook}, not {hook}: fit one at {hook} "
            "(steerdiff.whiten.fit_gaussian)."
        )
    want, have = g.meta.get("weights_hash"), getattr(lm, "weights_hash", None)
    if want and have and want != have:
        raise WhitenError(
            f"The Gaussian at {hook} was fitted on model {g.meta.get('model')!r} (weights "
            f"{str(want)[:12]}), not on this one ({str(have)[:12]}): fit it on this model."
        )
    d = hook_dim(unwrap(lm), hook)
    if d != g.dim:
        raise WhitenError(f"The Gaussian at {hook} is {g.dim} wide but the model's hook is {d}.")


def whitened_units(
    vectors: Mapping[str, torch.Tensor], gaussians: Mapping[str, Gaussian]
) -> dict[str, torch.Tensor]:
    """Each vector rescaled to Mahalanobis norm 1 under its hook's Gaussian (same direction,
    same dtype): coeff c times the result is c standard deviations of the data along the
    vector ("c whitened units"). A hook without a Gaussian, or a Gaussian of another hook,
    is a one-line WhitenError."""
    out: dict[str, torch.Tensor] = {}
    for hook, v in vectors.items():
        g = gaussians.get(hook)
        if g is None:
            have = ", ".join(sorted(gaussians)) or "none"
            raise WhitenError(
                f"No Gaussian for {hook} (have: {have}): fit one at {hook} "
                f"(steerdiff whiten fit --hook {hook}) to steer in whitened units."
            )
        if g.hook != hook:
            raise WhitenError(
                f"The Gaussian given for {hook} was fitted at {g.hook}: fit one at {hook}."
            )
        out[hook] = (v.double() * whitened_coeff(g, v, 1.0)).to(v.dtype)
    return out


def gaussians_for(
    lm: LoadedModel,
    hooks: Sequence[str],
    texts: Sequence[str],
    max_tokens: int = 64,
    shrinkage: str | float = "ledoit-wolf",
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Gaussian]:
    """{hook: Gaussian} fitted on `texts` (callers pass the corpus, e.g.
    interpret.corpus.load_corpus(n=200).texts), fitting only the hooks not already in
    `cache_dir` (keyed by model weights, texts, max_tokens and shrinkage)."""
    key = hashlib.sha256(
        json.dumps(
            [getattr(lm, "weights_hash", None), list(texts), max_tokens, str(shrinkage)]
        ).encode()
    ).hexdigest()[:16]
    path = {h: Path(cache_dir) / f"{h}-{key}.safetensors" for h in hooks} if cache_dir else {}
    out = {h: Gaussian.load(p) for h, p in path.items() if p.is_file()}
    todo = [h for h in hooks if h not in out]
    if todo:
        fitted = fit_gaussians(lm, todo, texts, max_tokens, shrinkage=shrinkage, progress=progress)
        for h, g in fitted.items():
            if cache_dir:
                g.save(path[h])
            out[h] = g
    return {h: out[h] for h in hooks}


def place_gaussian(g: Gaussian, hooks: Sequence[str]) -> dict[str, Gaussian]:
    """Where one given Gaussian applies: the only hook of a one-hook set (check_for then says
    if it was fitted elsewhere), else its own hook."""
    return {hooks[0]: g} if len(hooks) == 1 else {g.hook: g}


def resolve_gaussians(
    lm: LoadedModel,
    hooks: Sequence[str],
    given: Mapping[str, Gaussian],
    texts: Sequence[str] | None,
) -> dict[str, Gaussian]:
    """{hook: Gaussian} that whitened units at `hooks` are measured in: the given ones
    (each checked against the model and its hook), the rest fitted on `texts` in one pass
    per text (fit_gaussians)."""
    for hook in hooks:
        if hook in given:
            check_for(given[hook], lm, hook)
    missing = [h for h in hooks if h not in given]
    if missing and not texts:
        raise WhitenError(
            f"Whitened units at {missing[0]} need a Gaussian: give a saved one (steerdiff "
            f"whiten fit --hook {missing[0]} --out FILE) or texts to fit one on."
        )
    fitted = fit_gaussians(lm, missing, list(texts or [])) if missing else {}
    return {h: given[h] if h in given else fitted[h] for h in hooks}


def vector_figures(g: Gaussian, v: torch.Tensor) -> dict[str, float]:
    """How big v is at its hook: L2 norm, Mahalanobis norm, the data's spread along it, and the
    L2 coeff of 1 whitened unit (1 / ||v||_M)."""
    m = float(g.mahalanobis_norm(v))
    return {
        "l2_norm": float(v.double().norm()),
        "mahalanobis_norm": m,
        "spread": g.spread(v),
        "l2_coeff_per_whitened_unit": 1.0 / m if m > 0 else float("inf"),
    }


class WhitenStageConfig(BaseModel):
    """The experiment file's [whiten] table: fit Gaussians at hooks on the corpus and measure
    the teacher vector and each fitted vector set in them (pipeline/whiten_stage.py).

    hooks: None = the teacher's hook and every fitted vector set's resid hooks."""

    model_config = ConfigDict(extra="forbid")

    hooks: list[str] | None = None
    texts: int = Field(100, ge=2)  # corpus texts to fit on (a seeded subset)
    max_tokens: int = Field(64, ge=2)  # tokens per text
    shrinkage: Literal["ledoit-wolf", "none"] | float = "ledoit-wolf"
    eval_texts: int = Field(20, ge=1)  # corpus texts the steered distances are measured on
