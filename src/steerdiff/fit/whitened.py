"""Whitened fits: a penalty on, or a cap of, each fitted vector's Mahalanobis norm.

For a vector v at a hook whose activations have covariance cov (a `steerdiff.whiten.Gaussian`),

    ||v||_M = sqrt(v^T cov^-1 v) = |W v|,   W = L^-1, cov = L L^T (Cholesky)

is v's length in standard deviations of the data along it. FitConfig fields:

    whiten            the Gaussians: a file (one hook), a folder of <hook>.safetensors, or "auto"
    whiten_penalty    loss += whiten_penalty * sum_h ||v_h||_M^2   (gradient 2 * penalty * cov^-1 v)
    whiten_max_norm   after every optimizer step, v_h *= min(1, whiten_max_norm / ||v_h||_M)

W is computed once per hook, in float64, at the fit's start; the penalty and the cap are taken
on the trained vectors themselves (with lr_units "activation" the parameters ARE v; only
their learning rates are scaled). A fit with `whiten` records each vector's final
Mahalanobis and L2 norms in its result ("whitened_norms") and the Gaussians it used
("whiten_gaussians"). "auto" fits one Gaussian per hook on `whiten_texts` texts of the
offline corpus (interpret.corpus.load_corpus) and keeps them in <out>/whiten/, so a resumed
fit measures in the same Gaussians.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import atomic_write_json, read_json
from ..models import LoadedModel
from ..whiten import Gaussian, WhitenError, check_for, fit_gaussians
from .config import FitConfig, FitResult
from .distributed import rank_world

AUTO = "auto"
CACHE_FOLDER = "whiten"  # under a fit's out_dir: the Gaussians "auto" fitted
TEXTS_KEY = "whiten_texts"  # in an "auto" Gaussian's meta: the whiten_texts it was fitted for


def gaussian_file(folder: Path, hook: str) -> Path:
    """Where a folder of Gaussians keeps the one at `hook`."""
    return folder / f"{hook}.safetensors"


class WhitenedNorms:
    """Mahalanobis norms of a fit's vectors, with the penalty and the cap built on them."""

    def __init__(
        self,
        gaussians: dict[str, Gaussian],
        penalty: float = 0.0,
        max_norm: float | None = None,
        sources: dict[str, str] | None = None,
    ):
        self.gaussians = gaussians
        self.weight, self.max_norm = penalty, max_norm
        self.sources = sources or {}
        # W = L^-1 per hook (float64): ||v||_M = |W v|, so ||v||_M^2 = v^T cov^-1 v
        self.whiteners: dict[str, torch.Tensor] = {}
        for hook, g in gaussians.items():
            chol = torch.linalg.cholesky(g.cov.double())
            eye = torch.eye(g.dim, dtype=torch.float64)
            self.whiteners[hook] = torch.linalg.solve_triangular(chol, eye, upper=False)

    def _w(self, hook: str, v: torch.Tensor) -> torch.Tensor:
        w = self.whiteners[hook]
        if w.device != v.device:
            w = self.whiteners[hook] = w.to(v.device)
        return w

    def norms(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{hook: ||v||_M} (float64 scalars, with the graph back to v)."""
        return {h: (self._w(h, v) @ v.double()).norm() for h, v in params.items()}

    def penalty(self, params: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """whiten_penalty x sum_h ||v_h||_M^2 (float32 scalar, differentiable); None at 0."""
        if self.weight == 0.0:
            return None
        total = sum((self._w(h, v) @ v.double()).square().sum() for h, v in params.items())
        return (self.weight * total).float()  # type: ignore[union-attr]

    @torch.no_grad()
    def constrain(self, params: dict[str, torch.Tensor]) -> None:
        """Scale each vector with ||v||_M > whiten_max_norm down to it (in place)."""
        if self.max_norm is None:
            return
        for h, n in self.norms(params).items():
            if float(n) > self.max_norm:
                params[h].mul_(self.max_norm / float(n))

    def fingerprint(self) -> str:
        """sha256 of every hook's mean and covariance: a resume must measure in the same
        Gaussians as the fit's start (checkpoint.run_identity compares it)."""
        h = hashlib.sha256()
        for hook in sorted(self.gaussians):
            g = self.gaussians[hook]
            h.update(hook.encode() + g.mean.double().numpy().tobytes())
            h.update(g.cov.double().numpy().tobytes())
        return h.hexdigest()[:16]

    def figures(self, params: dict[str, torch.Tensor]) -> dict[str, Any]:
        """What a fit's result records: each vector's Mahalanobis norm (float64, the
        Gaussian's own solve) and L2 norm, and where each Gaussian came from."""
        norms = {}
        for h, v in params.items():
            v = v.detach().double().cpu()
            norms[h] = {
                "mahalanobis": float(self.gaussians[h].mahalanobis_norm(v)),
                "l2": float(v.norm()),
            }
        gaussians = {
            h: {
                "source": self.sources.get(h, "in-memory"),
                "n_tokens": g.n_tokens,
                "shrinkage": g.shrinkage,
            }
            for h, g in self.gaussians.items()
        }
        return {"whitened_norms": norms, "whiten_gaussians": gaussians}


def whitened_norms(
    lm: LoadedModel | nn.Module,
    hooks: list[str],
    cfg: FitConfig,
    out_dir: str | Path | None = None,
) -> WhitenedNorms | None:
    """The WhitenedNorms of cfg.whiten for a fit at `hooks` (None without whiten).

    Every Gaussian must be one of its hook on this model (`whiten.check_for`: one-line
    WhitenError otherwise), checked here, before any training."""
    if not cfg.whiten:
        return None
    gaussians, sources = load_gaussians(lm, hooks, cfg.whiten, cfg.whiten_texts, out_dir)
    for hook in hooks:
        check_for(gaussians[hook], lm, hook)  # type: ignore[arg-type]
    return WhitenedNorms(gaussians, cfg.whiten_penalty, cfg.whiten_max_norm, sources)


def load_gaussians(
    lm: LoadedModel | nn.Module,
    hooks: list[str],
    spec: str,
    n_texts: int,
    out_dir: str | Path | None,
) -> tuple[dict[str, Gaussian], dict[str, str]]:
    """({hook: Gaussian}, {hook: where it came from}) for `spec`: a file, a folder or "auto"."""
    if spec == AUTO:
        return auto_gaussians(lm, hooks, n_texts, out_dir)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = {h: gaussian_file(path, h) for h in hooks}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise WhitenError(
                f"--whiten {path}: no {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + ": save one Gaussian per fitted hook there as <hook>.safetensors, or use "
                "--whiten auto."
            )
        return {h: Gaussian.load(f) for h, f in files.items()}, {
            h: str(f) for h, f in files.items()
        }
    if not path.exists():
        raise WhitenError(
            f"--whiten {path} does not exist: give a Gaussian file (steerdiff.whiten), a folder "
            "of <hook>.safetensors, or auto."
        )
    g = Gaussian.load(path)
    if len(hooks) != 1:
        raise WhitenError(
            f"--whiten {path} is one Gaussian (at {g.hook}) but the fit trains {len(hooks)} "
            "hooks: give a folder with one <hook>.safetensors per hook, or --whiten auto."
        )
    return {hooks[0]: g}, {hooks[0]: str(path)}


def auto_gaussians(
    lm: LoadedModel | nn.Module,
    hooks: list[str],
    n_texts: int,
    out_dir: str | Path | None,
) -> tuple[dict[str, Gaussian], dict[str, str]]:
    """One Gaussian per hook on n_texts offline-corpus texts; kept in <out_dir>/whiten/ and
    read back from there (a resumed or repeated fit into the same folder)."""
    if not isinstance(lm, LoadedModel):
        raise WhitenError(
            "--whiten auto fits Gaussians on corpus text, which needs the model's tokenizer: "
            "pass a LoadedModel (steerdiff.models.load_model), or a saved Gaussian."
        )
    from ..interpret.corpus import load_corpus

    folder = Path(out_dir) / CACHE_FOLDER if out_dir is not None else None
    out: dict[str, Gaussian] = {}
    sources: dict[str, str] = {}
    for hook in hooks:
        cached = gaussian_file(folder, hook) if folder is not None else None
        if cached is not None and cached.is_file():
            g = Gaussian.load(cached)
            if g.meta.get(TEXTS_KEY) == n_texts:  # else: made for another whiten_texts
                out[hook], sources[hook] = g, str(cached)
    todo = [h for h in hooks if h not in out]
    if todo:
        texts = load_corpus(n=n_texts).texts
        print(
            f"fit: whiten auto: fitting {len(todo)} Gaussian(s) on {len(texts)} corpus texts",
            file=sys.stderr,
            flush=True,
        )
        for hook, g in fit_gaussians(lm, todo, texts).items():  # one pass per text
            g.meta[TEXTS_KEY] = n_texts
            out[hook], sources[hook] = g, f"auto ({len(texts)} corpus texts)"
            if folder is not None and rank_world()[0] == 0:
                folder.mkdir(parents=True, exist_ok=True)
                g.save(gaussian_file(folder, hook))
                sources[hook] = str(gaussian_file(folder, hook))
    return {h: out[h] for h in hooks}, sources


def finish_whitened_fit(
    norms: WhitenedNorms | None, params: dict[str, torch.Tensor], res: FitResult
) -> None:
    """A whitened fit's result gets its vectors' norms, in res.extra and result.json."""
    if norms is None:
        return
    res.extra.update(norms.figures(params))
    path = res.out_dir / "result.json" if res.out_dir is not None else None
    if path is not None and path.exists() and rank_world()[0] == 0:
        atomic_write_json(path, {**read_json(path), **norms.figures(params)})
