"""fit(): a VectorSet fitted to a dataset (steering-vector distillation, all model weights
frozen), and evaluate_vectors() for vectors fitted earlier.

Every fit (vectors here, LoRA and full finetunes in fit.baselines) starts the same way,
`prepare_fit`: read and tokenize the data, split off validation rows, and score them
under the base model and the teacher; then `FitData.train` runs the shared loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hooks import HookError, family_of, select_hooks, steer
from ..io import atomic_write_json, provenance
from ..models import LoadedModel, unwrap, weights_hash_of_model
from ..teachers import Teacher
from ..vectors import VectorSet
from .config import FitConfig, FitError, FitResult, make_config
from .data import Example, TeacherLike, pad_id_of, prepare_examples, split_examples
from .distributed import maybe_init_distributed, rank_world
from .loop import train_student
from .losses import eval_losses, gap_figures
from .students import Student, VectorStudent, init_vectors
from .teacher import reference_losses

Data = str | os.PathLike | Sequence[dict] | Sequence[Example]


@dataclass
class FitData:
    """What a fit of a model to a dataset starts from."""

    train: list[Example]
    val: list[Example]
    teacher: dict  # the teacher spec (recorded in provenance and in the fitted vectors)
    base_val: dict | None  # eval_losses of the base model on val (None without val rows)
    teacher_val: dict | None  # ... of the teacher (None for a plain teacher)
    pad_id: int

    def train_student(self, student: Student, cfg: FitConfig, **kwargs: Any) -> FitResult:
        """`loop.train_student` on this data; kwargs: out_dir, resume, prov, on_step, ..."""
        return train_student(
            student,
            self.train,
            self.val,
            cfg,
            pad_id=self.pad_id,
            base_val=self.base_val,
            teacher_val=self.teacher_val,
            **kwargs,
        )


def prepare_fit(
    lm: LoadedModel | nn.Module, data: Data, cfg: FitConfig, teacher: TeacherLike = None
) -> FitData:
    """Examples, the seeded split, and the base model's and teacher's validation losses.

    teacher: a Teacher (used as it is), a TeacherConfig or a spec dict (built once);
    None = the dataset manifest's teacher.
    """
    maybe_init_distributed()
    examples, spec = prepare_examples(lm, data, teacher, cfg.max_len)
    train, val = split_examples(examples, cfg)
    base_val = teacher_val = None
    if val:
        scorer = teacher if isinstance(teacher, Teacher) else spec
        base_val, teacher_val = reference_losses(lm, val, scorer, cfg.micro)
    return FitData(train, val, spec, base_val, teacher_val, pad_id_of(lm))


def model_provenance(lm: LoadedModel | nn.Module, cfg: FitConfig) -> dict:
    """provenance() plus model id / weights hash also for a bare (in-memory) module."""
    prov = provenance(lm, cfg, cfg.seed)
    if not isinstance(lm, LoadedModel):
        prov.update(
            model_id="in-memory",
            model_type=lm.config.model_type,
            weights_hash=weights_hash_of_model(lm),
        )
    return prov


def fit(
    lm: LoadedModel | nn.Module,
    data: Data,
    config: FitConfig | None = None,
    *,
    teacher: TeacherLike = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
    **overrides: Any,
) -> FitResult:
    """Fit trainable vectors at `config.hooks` (all model weights frozen) to a dataset.

    data: a dataset JSONL path (its manifest gives the teacher), rows in the dataset
    format, or Examples. teacher: overrides the manifest's teacher (a spec dict, a
    TeacherConfig or a built Teacher; used for the teacher's validation loss and the gap
    closed). out_dir: checkpoints, metrics.jsonl / .csv, vectors.safetensors,
    result.json. resume: continue from out_dir's checkpoint.
    """
    cfg = make_config(config, overrides)
    model = unwrap(lm)
    family_of(model)
    try:
        names = select_hooks(model, cfg.hooks)
    except HookError as e:
        raise FitError(f"Hook selection {cfg.hooks} matches no hook point: {e}") from e
    d = prepare_fit(lm, data, cfg, teacher)
    model.requires_grad_(False)
    student = VectorStudent(model, init_vectors(model, names, cfg), cfg)
    prov = {**model_provenance(lm, cfg), "teacher": d.teacher, "hooks": names}

    def save(out: Path, params: dict[str, torch.Tensor], summary: dict) -> None:
        _vector_set(lm, params, cfg, summary, d.teacher).save(out / "vectors.safetensors")

    if rank_world()[0] == 0 and out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out_dir) / "config.json", {"config": cfg.model_dump(), **prov})
    res = d.train_student(
        student, cfg, out_dir=out_dir, resume=resume, prov=prov, on_step=on_step, save_params=save
    )
    res.vectors = _vector_set(lm, student.params, cfg, res.summary(), d.teacher)
    return res


def _vector_set(
    lm: LoadedModel | nn.Module,
    params: dict[str, torch.Tensor],
    cfg: FitConfig,
    summary: dict,
    teacher: dict,
) -> VectorSet:
    return VectorSet.for_model(
        lm,
        {k: v.detach().cpu().clone() for k, v in params.items()},
        method=f"fit:{cfg.objective}",
        positions="all",
        fit_config=cfg.model_dump(),
        fit_summary=summary,
        teacher=teacher,
    )


def evaluate_vectors(
    lm: LoadedModel | nn.Module,
    data: Data,
    vectors: VectorSet | dict[str, torch.Tensor],
    config: FitConfig | None = None,
    *,
    teacher: TeacherLike = None,
) -> dict[str, Any]:
    """Validation losses of base / teacher / base + `vectors` on the rows a fit with
    `config` holds out (same seed, same split), the gap closed and its bootstrap intervals.

    For vectors fitted earlier (or by someone else): the figures `fit` reports at its end.
    """
    cfg = config or FitConfig()
    d = prepare_fit(lm, data, cfg, teacher)
    if not d.val or d.base_val is None:
        raise FitError("No validation rows: set val_size or val_fraction above 0.")
    model = unwrap(lm)
    if isinstance(vectors, VectorSet):
        vectors.check_fits(model)  # a VectorSetError names the hook or shape that differs
    with steer(model, vectors):
        ev = eval_losses(model, d.val, cfg.micro, d.pad_id)
    return {
        "n_val_rows": len(d.val),
        "n_val_tokens": ev["n_tokens"],
        "base_val_loss": d.base_val["ce"],
        "teacher_val_loss": d.teacher_val["ce"] if d.teacher_val else None,
        "fitted_val_loss": ev["ce"],
        **gap_figures(d.base_val, ev, d.teacher_val, intervals=True),
    }
