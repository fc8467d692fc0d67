"""Ground truth for fitting: plant a known vector v* in a teacher, fit a student, compare.

teacher = base model + v* at one hook point (all positions). The teacher samples
completions; a student (the same base model) is fitted at that hook on the samples
(SFT on the tokens, or distillation on the teacher's top-k log-probs). A fit that
recovers the mechanism gives cosine(v_fitted, v*) close to 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..generate import sample
from ..hooks import get_hook_point, steer
from ..models import LoadedModel, unwrap
from .api import fit
from .config import FitConfig, FitResult
from .data import Example
from .teacher import annotate_topk


def sample_examples(
    lm: LoadedModel | nn.Module,
    prompts: Sequence[list[int]],
    vectors: dict[str, torch.Tensor] | None = None,
    coeff: float = 1.0,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> list[Example]:
    """Sample one completion per prompt (token ids) from the base model (+ vectors, all
    positions) with `generate.sample` (temperature 0: greedy).

    A completion ends after eos_id (kept) or at max_new_tokens.
    """
    model = unwrap(lm)
    ctx = steer(model, vectors, coeff) if vectors else contextlib.nullcontext()
    with ctx:
        samples = sample(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            stop_ids=[eos_id] if eos_id is not None else [],
            batch_size=batch_size,
            pad_id=pad_id,
        )
    return [
        Example(list(p), s.token_ids, id=i)
        for i, (p, s) in enumerate(zip(prompts, samples, strict=True))
    ]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=0))


@dataclass
class PlantedResult:
    hook: str
    n_samples: int
    objective: str
    optimizer: str
    cosine: float
    norm_ratio: float  # |v_fitted| / |v*|
    fit: FitResult
    v_star: torch.Tensor
    v_fitted: torch.Tensor

    def row(self) -> dict:
        return {
            "hook": self.hook,
            "n_samples": self.n_samples,
            "objective": self.objective,
            "optimizer": self.optimizer,
            "cosine": round(self.cosine, 4),
            "norm_ratio": round(self.norm_ratio, 4),
            "val_loss": self.fit.fitted_val_loss,
            "teacher_val_loss": self.fit.teacher_val_loss,
            "base_val_loss": self.fit.base_val_loss,
            "gap_closed": self.fit.gap_closed,
        }


def random_vector(
    lm: LoadedModel | nn.Module, hook: str, norm: float, seed: int = 0
) -> torch.Tensor:
    dim = get_hook_point(unwrap(lm), hook).dim
    v = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return v * (norm / v.norm())


def planted_experiment(
    lm: LoadedModel | nn.Module,
    hook: str,
    v_star: torch.Tensor,
    prompts: Sequence[list[int]],
    config: FitConfig,
    *,
    max_new_tokens: int = 16,
    topk: int = 20,
    eos_id: int | None = None,
    pad_id: int = 0,
    seed: int = 0,
    examples: list[Example] | None = None,
) -> PlantedResult:
    """Teacher = model + v* at `hook`; sample one completion per prompt; fit at `hook`.

    Pass `examples` (already sampled, with top-k) to reuse one teacher dataset across fits.
    """
    teacher = {"kind": "steered", "vectors": {hook: v_star}, "coeff": 1.0, "positions": "all"}
    if examples is None:
        examples = sample_examples(
            lm,
            prompts,
            {hook: v_star},
            1.0,
            max_new_tokens,
            seed=seed,
            eos_id=eos_id,
            pad_id=pad_id,
        )
        if config.objective == "distill":  # (auto: online, the teacher runs during the fit)
            annotate_topk(lm, examples, teacher, k=topk)
    cfg = config.model_copy(update={"hooks": [hook]})
    res = fit(lm, examples, cfg, teacher=teacher)
    v = res.vectors[hook]
    return PlantedResult(
        hook=hook,
        n_samples=len(examples),
        objective=res.extra.get("objective", cfg.objective),
        optimizer=cfg.optimizer,
        cosine=cosine(v, v_star),
        norm_ratio=float(v.norm() / v_star.norm()),
        fit=res,
        v_star=v_star,
        v_fitted=v,
    )
