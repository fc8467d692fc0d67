"""Fitting a vector in an SAE's latent basis (FitConfig basis "sae"): a sparse code z.

Instead of a free vector v [d_in] at the SAE's hook, the fit trains a code z [d_sae] over
the SAE's decoder directions and steers with

    v = z @ W_dec                                   [d_in], added at the hook as any vector
    loss = (CE or KL per completion token) + l1 * sum_i |z_i| * ||W_dec[i]||

(the L1 term, `LatentStudent.penalty`, weighs each latent by its decoder row's norm, so an
SAE whose rows are not unit norm is penalised per unit of the vector it adds). The steering
itself is `VectorStudent`'s (prefix cache, replay, memory plans): a LatentStudent holds one
and hands it v each forward. A fit's output is an ordinary VectorSet of v (every reader and
eval takes it unchanged) and `latent_code.safetensors` beside it: z per hook, the SAE's path
and sha256, l1, and a summary (top latents, L0). `compare_with_pullback` sets such a code
next to the decomposition of an ordinary fit's vector (interpret.sae_decompose): the
comparison issue 15 asks for. docs/sae-fit.md has the figures.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hooks import get_hook_point, select_hooks
from ..interpret.sae_decompose import decompose_vector
from ..io import atomic_path, atomic_write_json, read_json
from ..models import LoadedModel, unwrap
from ..sae import SAE, SAEError, check_fits, load_sae
from .config import FitConfig, FitError, FitResult
from .data import Batch, Example
from .distributed import rank_world
from .memory import CacheUse
from .online import Target
from .students import Student, VectorStudent

CODE_FILE = "latent_code.safetensors"
# a latent counts towards a code's L0 when its weighted coefficient |z_i| * ||W_dec[i]|| is
# at least this fraction of the largest one (Adam leaves tiny nonzero values, never exact 0)
L0_REL_THRESHOLD = 0.01
SUFFIX = ":sae_code"  # a code's key among the trained parameters (not the hook's own name)


def code_key(hook: str) -> str:
    """The trained-parameter name of the code at `hook` (kept apart from vectors' names, so
    the loop's cosine with a teacher's vector at the hook does not compare a code with it)."""
    return hook + SUFFIX


class LatentStudent(Student):
    """Base model + v = z @ W_dec at the SAE's hook; z [d_sae] is what is trained."""

    def __init__(self, model: nn.Module, sae: SAE, cfg: FitConfig):
        assert sae.hook is not None
        self.model, self.sae, self.hook, self.l1 = model, sae, sae.hook, cfg.l1
        device = next(model.parameters()).device
        self.W_dec = sae.W_dec.detach().to(device=device, dtype=torch.float32)  # [d_sae, d_in]
        self.row_norms = self.W_dec.norm(dim=1)  # [d_sae]
        g = torch.Generator().manual_seed(cfg.seed)
        z = torch.zeros(sae.d_sae)
        if cfg.init == "random":
            z = cfg.init_scale * torch.randn(sae.d_sae, generator=g)
        self.params = {code_key(self.hook): z.to(device).requires_grad_(True)}
        # the steering machinery; its vector is set from z before each use (`_set_vector`)
        self.inner = VectorStudent(model, {self.hook: self.vector().detach()}, cfg)

    @property
    def code(self) -> torch.Tensor:
        return self.params[code_key(self.hook)]

    def vector(self) -> torch.Tensor:
        """v = z @ W_dec [d_in] (with the graph back to z when gradients are on)."""
        return self.code @ self.W_dec

    def vectors(self) -> dict[str, torch.Tensor]:
        """{hook: v}, detached on the CPU: what the fit's VectorSet holds."""
        return {self.hook: self.vector().detach().cpu().clone()}

    def _set_vector(self) -> None:
        v = self.vector()
        self.inner.params[self.hook] = v
        self.inner.by_layer[get_hook_point(self.model, self.hook).layer][self.hook] = v

    def losses(
        self, batch: Batch, key: Any, objective: str, target: Target | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._set_vector()
        return self.inner.losses(batch, key, objective, target)

    def penalty(self) -> torch.Tensor:
        """l1 * sum_i |z_i| * ||W_dec[i]|| (a scalar with its graph back to z)."""
        return self.l1 * (self.code.abs() * self.row_norms).sum()

    def activation_scales(self, rows: Sequence[Example], pad_id: int) -> dict[str, float]:
        """The hook's activation RMS per coordinate s (as a vector fit's) x d_in / d_sae /
        the mean decoder-row norm. Adam's first steps move each coefficient by about lr x
        this (a sign step); then v = z @ W_dec moves about as far, and as fast along the
        gradient, as a vector fit's v with the same lr (lr x s on each of d_in coordinates)
        for decoder rows in general position, instead of about d_sae / d_in times faster."""
        shrink = self.sae.d_in / self.sae.d_sae / float(self.row_norms.mean())
        scales = self.inner.activation_scales(rows, pad_id)
        return {code_key(h): s * shrink for h, s in scales.items()}

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        with torch.no_grad():
            self._set_vector()
        with self.inner.active() as m:
            yield m

    def plan_memory(self, use: CacheUse, cfg: FitConfig, say: bool = True) -> None:
        self.inner.plan_memory(use, cfg, say)

    def release_cache(self) -> None:
        self.inner.release_cache()


# ------------------------------------------------------------------ the SAE a fit uses


def sae_basis(lm: LoadedModel | nn.Module, cfg: FitConfig) -> tuple[FitConfig, SAE | None]:
    """(cfg, None) for basis "residual"; for "sae": the SAE (checked against the model) and
    cfg with hooks = [the SAE's hook]. hooks left at their default become the SAE's hook;
    hooks that select anything else are a one-line FitError."""
    if cfg.basis != "sae":
        return cfg, None
    assert cfg.sae is not None  # FitConfig's validator
    model = unwrap(lm)
    given = cfg.hooks != FitConfig.model_fields["hooks"].default
    names = select_hooks(model, cfg.hooks) if given else []
    try:
        sae = load_sae(cfg.sae)
    except SAEError as e:  # a Gemma Scope file names no hook: the one hook given is it
        if len(names) != 1 or "does not say which hook" not in str(e):
            raise
        sae = load_sae(cfg.sae, hook=names[0])
    check_fits(sae, model)
    if given and names != [sae.hook]:
        raise FitError(
            f"basis 'sae': --hooks {cfg.hooks} selects {names}, but {sae.name} reads "
            f"{sae.hook!r}: a latent-basis fit is at the SAE's hook; use --hooks {sae.hook} "
            "(or leave --hooks out)."
        )
    return cfg.model_copy(update={"hooks": [sae.hook]}), sae


def sae_provenance(sae: SAE) -> dict[str, Any]:
    """The SAE a code was fitted over: path, format, sha256, hook, d_sae."""
    return {**sae.source, "hook": sae.hook, "d_sae": sae.d_sae}


def latent_provenance(sae: SAE | None) -> dict[str, Any]:
    """What a fit's provenance records of its SAE ({} for basis "residual"); sae_sha256 is
    part of the checkpoint's identity, so a resume over another SAE file is refused."""
    if sae is None:
        return {}
    return {"sae": sae_provenance(sae), "sae_sha256": sae.source.get("sha256")}


def trained_vectors(student: Student) -> dict[str, torch.Tensor]:
    """The vectors a fit's VectorSet holds: v = z @ W_dec for a LatentStudent, else its params."""
    return student.vectors() if isinstance(student, LatentStudent) else student.params


def record_code(student: Student, summary: dict, out: Path | None) -> dict:
    """summary + {"latent_code": the code's metadata} for a LatentStudent (and, with `out`,
    out/latent_code.safetensors written); `summary` unchanged for other students."""
    if not isinstance(student, LatentStudent):
        return summary
    codes = dict(student.params)
    meta = save_latent_code(out, student.sae, codes, student.l1) if out else None
    return {**summary, "latent_code": meta or code_metadata(student.sae, codes, student.l1)}


def finish_latent_fit(student: Student, res: FitResult) -> None:
    """A latent-basis fit's result gets its code's metadata, in res.extra and result.json."""
    if not isinstance(student, LatentStudent):
        return
    res.extra = record_code(student, res.extra, None)
    path = res.out_dir / "result.json" if res.out_dir is not None else None
    if path is not None and path.exists() and rank_world()[0] == 0:
        atomic_write_json(path, {**read_json(path), "latent_code": res.extra["latent_code"]})


# ------------------------------------------------------------------ what a code says


def weighted(code: torch.Tensor, sae: SAE) -> torch.Tensor:
    """z_i * ||W_dec[i]||: each latent's signed contribution, in units of the vector [d_sae]."""
    return code.detach().float().cpu() * sae.W_dec.detach().float().cpu().norm(dim=1)


def code_l0(code: torch.Tensor, sae: SAE, rel: float = L0_REL_THRESHOLD) -> int:
    """Latents whose |z_i| * ||W_dec[i]|| is >= rel x the largest (0 for an all-zero code)."""
    w = weighted(code, sae).abs()
    top = float(w.max()) if w.numel() else 0.0
    return int((w >= rel * top).sum()) if top > 0 else 0


def code_summary(code: torch.Tensor, sae: SAE, k: int = 10) -> dict[str, Any]:
    """L0 (at L0_REL_THRESHOLD), the L1 norm sum |z_i| ||W_dec[i]||, the share of it in the
    top k latents, and the top k latents by |z_i| ||W_dec[i]|| with their signed values."""
    w = weighted(code, sae)
    order = torch.argsort(w.abs(), descending=True)[:k]
    total = float(w.abs().sum())
    return {
        "l0": code_l0(code, sae),
        "l0_threshold": f"{L0_REL_THRESHOLD} x the largest |z_i| ||W_dec[i]||",
        "l1_norm": total,
        "top_k_share": float(w.abs()[order].sum()) / total if total > 0 else None,
        "top": [{"latent": int(i), "weight": float(w[i]), "z": float(code[i])} for i in order],
    }


def _by_hook(codes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removesuffix(SUFFIX): v.detach().float().cpu().contiguous() for k, v in codes.items()}


def code_metadata(sae: SAE, codes: dict[str, torch.Tensor], l1: float) -> dict[str, Any]:
    """The SAE (path, sha256, hook), l1, and each hook's code_summary."""
    summary = {h: code_summary(z, sae) for h, z in _by_hook(codes).items()}
    return {"sae": sae_provenance(sae), "l1": l1, "summary": summary}


def save_latent_code(
    out: Path, sae: SAE, codes: dict[str, torch.Tensor], l1: float
) -> dict[str, Any]:
    """Write out/latent_code.safetensors atomically ({hook: z}; code_metadata in its
    header); returns that metadata."""
    from safetensors.torch import save_file

    hooks, meta = _by_hook(codes), code_metadata(sae, codes, l1)
    with atomic_path(out / CODE_FILE) as tmp:
        save_file(hooks, str(tmp), metadata={"steerdiff_latent_code": json.dumps(meta)})
    return meta


def load_latent_code(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """({hook: z [d_sae]}, metadata) of a latent_code.safetensors (a file or its fit folder)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    path = path / CODE_FILE if path.is_dir() else path
    if not path.is_file():
        raise FitError(f"{path} is missing: it is written by a fit with basis 'sae'.")
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("steerdiff_latent_code", "{}"))
    return load_file(str(path)), meta


def compare_with_pullback(
    code: torch.Tensor, ordinary: torch.Tensor, sae: SAE, k: int = 10
) -> dict[str, Any]:
    """A latent-basis code z [d_sae] next to an ordinary fit's vector [d_in] at the same hook.

    Top latents are the most positive first on both sides: the code's by z_i ||W_dec[i]||,
    the ordinary vector's by cosine with each decoder row and by its pullback W_dec v
    (interpret.sae_decompose). Returns the three top-k lists, their overlaps (shared / k),
    the rank by cosine of the code's top latent, cosine(z @ W_dec, ordinary), the norms and
    the code's L0."""
    code = code.detach().float().cpu()
    if code.numel() != sae.d_sae:
        raise SAEError(
            f"The code has {code.numel()} entries but {sae.name} has {sae.d_sae} latents."
        )
    v_code = code @ sae.W_dec.detach().float().cpu()
    dec = decompose_vector(sae, ordinary)
    top_code = torch.argsort(weighted(code, sae), descending=True)[:k].tolist()
    top_cos = dec.order[:k].tolist()
    top_pull = torch.argsort(dec.pullback_dec, descending=True)[:k].tolist()
    ordinary = ordinary.detach().float().cpu().flatten()
    cos = torch.nn.functional.cosine_similarity(v_code, ordinary, dim=0)
    return {
        "k": k,
        "l0": code_l0(code, sae),
        "cosine": float(cos),
        "norm_latent": float(v_code.norm()),
        "norm_ordinary": float(ordinary.norm()),
        "top_code": top_code,
        "top_cosine": top_cos,
        "top_pullback_dec": top_pull,
        "overlap_cosine": len(set(top_code) & set(top_cos)) / k,
        "overlap_pullback_dec": len(set(top_code) & set(top_pull)) / k,
        "code_top1_rank_by_cosine": dec.rank(top_code[0]),
    }
