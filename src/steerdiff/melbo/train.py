"""MELBO training: N orthogonal steering vectors of norm R that most change a later layer.

The objective (Mack & Turner 2024, "Mechanistically Eliciting Latent Behaviors in Language
Models", AI Alignment Forum; github.com/amack315/unsupervised-steering-vectors): for a
vector theta added at the source hook (every position) and the target-layer activations
Z_i,t(theta) of prompt i at position t,

    maximise  sum_i ( sum_t ||Z_i,t(theta) - Z_i,t(0)||_2^p )^(1/q)   s.t.  ||theta|| = R

by projected gradient ascent on the sphere: the gradient is projected onto the sphere's
tangent space and off the span of the vectors learned before, an Adam step is taken (AMSGrad,
betas (0.9, 0.98), as in the reference code), and theta is projected off that span again
and rescaled to norm R. Vectors are learned one after another, each orthogonal to the ones
before. The published defaults are p = q = 2 and 300 steps at lr 1e-3; we default to 100
steps at lr 1e-2 (CPU budgets), and the objective curve is kept so convergence is visible.

norm "whitened": theta = L u with L L^T = the covariance of a Gaussian at the source hook
(steerdiff.whiten); u lives on the Euclidean sphere of radius R, so ||theta||_M = R, and the
vectors are orthogonal in the whitened metric (theta_i^T cov^-1 theta_j = 0).

Only blocks source..target run per step: the blocks below the source block run once per
prompt batch (replay.compute_prefix) and nothing after the target block runs at all.
Prompts are right-padded (causal attention: real tokens never see the padding) and padding
is left out of the objective. The unsteered Z(0) is computed once.

One departure from the published objective, by default: the first `skip_first` = 1
position of each prompt is left out of the sum (skip_first=0 restores the published sum over
every position). The first token's activations are massive in many models (||Z|| ~ 25,000 at
SmolLM2-135M's blocks.20 vs ~200 elsewhere), and on SmolLM2 the unmodified objective is won by
moving that attention-sink token alone (||dZ|| ~ 430 there, ~2 at every other position, no
change in the next-token distributions), which elicits nothing. The vector is still added at
every position, the first included.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..chat import read_lines_resource
from ..evals.scoring import question_prompts
from ..hooks import get_blocks, get_hook_point, record, steer
from ..interpret.batching import padded_batches
from ..io import provenance
from ..models import LoadedModel, unwrap
from ..progress import progress as progress_bar
from ..replay import Prefix, call_block, compute_prefix
from ..whiten import Gaussian, check_for, fit_gaussian
from .config import MelboConfig, MelboError
from .store import MelboResult, load_done, save_vector, train_settings

Prompts = Sequence[str] | Sequence[Sequence[int]]


@dataclass
class _Batch:
    prefix: Prefix  # blocks below the source block, run once; the calls of the rest
    mask: torch.Tensor  # [b, s] bool: real tokens from position skip_first on
    base: torch.Tensor | None = None  # [b, s, d] Z(0) at the target hook


@dataclass
class TargetMap:
    """theta at the source hook -> activations at the target hook, on fixed prompts."""

    lm: LoadedModel
    source: str
    target: str
    ids: list[list[int]]
    batch_size: int = 8
    skip_first: int = 1  # positions < skip_first of each prompt left out of the objective
    batches: list[_Batch] = field(default_factory=list)

    def __post_init__(self) -> None:
        model = unwrap(self.lm)
        hs, ht = get_hook_point(model, self.source), get_hook_point(model, self.target)
        if ht.layer <= hs.layer:
            raise MelboError(
                f"The target hook {self.target} is not in a later block than the source hook "
                f"{self.source}: pick a target in block {hs.layer + 1} or later."
            )
        self.first, self.last = hs.layer, ht.layer
        dev = next(model.parameters()).device
        for x, m in padded_batches(self.ids, self.batch_size, pad_id=0):
            prefix = compute_prefix(model, x.to(dev), m.to(dev), start=self.first)
            keep = m.bool()
            keep[:, : self.skip_first] = False  # right padding: each row starts at 0
            self.batches.append(_Batch(prefix, keep.to(dev)))
        with torch.no_grad():
            for b in self.batches:
                b.base = self.run(b, None)

    @property
    def dim(self) -> int:
        return get_hook_point(unwrap(self.lm), self.source).dim

    def run(self, b: _Batch, theta: torch.Tensor | None) -> torch.Tensor:
        """Z at the target hook [b, s, d] (float32) with theta added at the source hook."""
        model = unwrap(self.lm)
        blocks = get_blocks(model)
        ctx = steer(model, {self.source: theta}) if theta is not None else nullcontext()
        with ctx, record(model, [self.target], detach=False) as rec:
            h = b.prefix.hidden
            for j in range(self.first, self.last + 1):
                h = call_block(blocks[j], j, h, b.prefix.calls[j - self.first])
        return rec[self.target].float()

    def delta_norms(self, b: _Batch, theta: torch.Tensor) -> torch.Tensor:
        """||Z_t(theta) - Z_t(0)||_2 per position [b, s] (padding: 0)."""
        assert b.base is not None
        n = (self.run(b, theta) - b.base).norm(dim=-1)
        return torch.where(b.mask, n, torch.zeros_like(n))

    @torch.no_grad()
    def stats(self, theta: torch.Tensor, p: float, q: float) -> dict[str, float]:
        """The objective, and the mean ||dZ|| and ||Z(0)|| over real positions, for theta."""
        obj, change, base, n = 0.0, 0.0, 0.0, 0
        for b in self.batches:
            assert b.base is not None
            dn = self.delta_norms(b, theta)
            obj += float(objective_rows(dn, b.mask, p, q).sum())
            change += float(dn.sum())
            base += float(b.base.norm(dim=-1)[b.mask].sum())
            n += int(b.mask.sum())
        return {"objective": obj, "change": change / n, "base_norm": base / n}


def objective_rows(dn: torch.Tensor, mask: torch.Tensor, p: float, q: float) -> torch.Tensor:
    """(sum over real positions of ||dZ||^p)^(1/q) per prompt [b]."""
    return (dn.pow(p) * mask).sum(1).pow(1.0 / q)


def project_out(v: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """v without its components along the rows of prev [k, d] (orthogonal, any norms)."""
    if prev.shape[0] == 0:
        return v
    unit = prev / prev.norm(dim=1, keepdim=True)
    for _ in range(2):  # twice: float32 leaves ~1e-7 of a component after one pass
        v = v - unit.T @ (unit @ v)
    return v


def random_on_sphere(d: int, radius: float, prev: torch.Tensor, gen: torch.Generator):
    """A random vector [d] of norm radius, orthogonal to the rows of prev."""
    v = project_out(torch.randn(d, generator=gen), prev)
    return v * (radius / v.norm())


def train_vector(
    tmap: TargetMap,
    radius: float,
    basis: torch.Tensor | None,
    prev: torch.Tensor,
    cfg: MelboConfig,
    steps: int,
    gen: torch.Generator,
    desc: str = "melbo",
    progress: bool = True,
) -> tuple[torch.Tensor, list[float]]:
    """One vector u [d] (theta = basis @ u, or u for l2) and its objective curve (steps + 1
    values: before each step, and after the last)."""
    dev = tmap.batches[0].mask.device
    u = random_on_sphere(tmap.dim, radius, prev, gen).to(dev).requires_grad_(True)
    prev = prev.to(dev)
    opt = torch.optim.Adam([u], lr=cfg.lr, betas=(0.9, 0.98), amsgrad=True)
    p, q = cfg.p, cfg.q_
    curve: list[float] = []
    with progress_bar(steps, desc, disable=not progress) as bar:
        for _ in range(steps):
            opt.zero_grad()
            total = 0.0
            for b in tmap.batches:  # one backward per batch: the grads add up
                theta = u if basis is None else basis @ u
                obj = objective_rows(tmap.delta_norms(b, theta), b.mask, p, q).sum()
                (-obj).backward()
                total += float(obj.detach())
            curve.append(total)
            with torch.no_grad():
                assert u.grad is not None
                g = project_out(u.grad, prev)
                u.grad = g - (g @ u) * u / radius**2  # the sphere's tangent space
                opt.step()
                v = project_out(u, prev)
                u.copy_(v * (radius / v.norm()))
            bar.update(1)
            bar.set_postfix(objective=f"{total:.4g}")
    u = u.detach()
    curve.append(tmap.stats(u if basis is None else basis @ u, p, q)["objective"])
    return u, curve


def prompt_ids(
    lm: LoadedModel, cfg: MelboConfig, prompts: Prompts | None = None
) -> list[list[int]]:
    """Token ids of the training prompts (each cut to max_tokens): given ids as they are; given
    texts (or cfg.prompts, a .txt file, or the packaged questions) as chat prompts."""
    if prompts is None and cfg.prompts is not None:
        path = Path(cfg.prompts)
        if not path.is_file():
            raise MelboError(f"prompts file {path} does not exist: give a .txt file, one a line.")
        prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if prompts is None:
        prompts = read_lines_resource("contrast_questions.txt")
    prompts = list(prompts)[: cfg.n_prompts]
    if not prompts:
        raise MelboError("No prompts to train on: give at least one (--prompts FILE).")
    if isinstance(prompts[0], str):
        if lm.tokenizer is None:
            raise MelboError("This model has no tokenizer: give the prompts as token ids.")
        ids = question_prompts(lm, [str(t) for t in prompts], None)
    else:
        ids = [list(map(int, r)) for r in prompts]  # type: ignore[arg-type]
    return [r[: cfg.max_tokens] for r in ids]


def whitening_basis(
    lm: LoadedModel, cfg: MelboConfig, gaussian: Gaussian | None = None
) -> tuple[torch.Tensor | None, Gaussian | None]:
    """(L, the Gaussian) for norm "whitened" (L L^T = its covariance), (None, None) for l2."""
    if cfg.norm == "l2":
        return None, None
    if gaussian is None and cfg.whiten is not None:
        gaussian = Gaussian.load(cfg.whiten)
    if gaussian is None:
        from ..interpret.corpus import load_corpus

        texts = load_corpus(n=cfg.whiten_texts, seed=cfg.seed).texts
        gaussian = fit_gaussian(lm, cfg.source_hook, texts, max_tokens=cfg.max_tokens)
    check_for(gaussian, lm, cfg.source_hook)
    dev = next(unwrap(lm).parameters()).device
    return torch.linalg.cholesky(gaussian.cov).float().to(dev), gaussian


def train_melbo(
    lm: LoadedModel,
    cfg: MelboConfig,
    prompts: Prompts | None = None,
    progress: bool = True,
    out: str | Path | None = None,
    gaussian: Gaussian | None = None,
) -> MelboResult:
    """Learn cfg.n_vectors MELBO vectors (see the module docstring).

    prompts: texts (chat-templated here) or token ids; None: cfg.prompts or the packaged
    questions. out: a folder where each finished vector is saved (vector_NN.safetensors);
    on a rerun with the same settings those are loaded, not trained again.
    gaussian: for norm "whitened" (else cfg.whiten, else fitted on corpus text).
    """
    ids = prompt_ids(lm, cfg, prompts)
    basis, g = whitening_basis(lm, cfg, gaussian)
    tmap = TargetMap(lm, cfg.source_hook, cfg.target_hook, ids, cfg.batch_size, cfg.skip_first)
    settings = train_settings(cfg, ids)
    done = load_done(out, settings, lm)[: cfg.n_vectors] if out is not None else []
    us = [_to_u(t, basis) for t, _ in done]
    curves = [c for _, c in done]
    dev = tmap.batches[0].mask.device
    for i in range(len(done), cfg.n_vectors):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + i)
        prev = torch.stack(us) if us else torch.zeros(0, tmap.dim, device=dev)
        u, curve = train_vector(
            tmap, cfg.radius, basis, prev, cfg, cfg.steps, gen, f"melbo vector {i}", progress
        )
        us.append(u)
        curves.append(curve)
        if out is not None:
            save_vector(out, i, _theta(u, basis), curve, settings, lm)
    thetas = torch.stack([_theta(u, basis) for u in us]) if us else torch.zeros(0, tmap.dim)
    base = tmap.stats(torch.zeros(tmap.dim, device=dev), cfg.p, cfg.q_)["base_norm"]
    return MelboResult(
        source_hook=cfg.source_hook,
        target_hook=cfg.target_hook,
        radius=cfg.radius,
        norm=cfg.norm,
        vectors=thetas.cpu(),
        curves=curves,
        base_norm=base,
        n_prompts=len(ids),
        n_tokens=sum(len(r) for r in ids),
        provenance=provenance(lm, cfg, cfg.seed),
        gaussian=g,
    )


def _theta(u: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    if basis is None:
        return u.detach().float().cpu()
    return (basis.double() @ u.double()).float().cpu()


def _to_u(theta: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Back to the sphere's coordinates (a resumed vector)."""
    dev = basis.device if basis is not None else theta.device
    if basis is None:
        return theta.float().to(dev)
    L = basis.double()
    return torch.linalg.solve_triangular(L, theta.double().to(dev)[:, None], upper=False)[
        :, 0
    ].float()
