"""Alignment over training: does a finetuned student move its activations along the
teacher's steering vector? (Blank et al. 2026 measure the cosine between the student's
induced activation shift and the teacher's vector during finetuning.)

    base = mean_activation(model, probe, hook)                   # before training, [d]
    shift = activation_shift(student_model, base, probe, hook)   # student - base, [d]
    logger = AlignmentLogger(probe, hook, v_star, base, every=5)
    fit_lora(lm, data, cfg, lora, on_step=logger)                # rows get the columns

The probe is a fixed list of token-id prompts (e.g. number prompts in the chat template);
the shift is the mean over the probe's real positions ("all") or over each prompt's last
position ("last") of the student's activation minus the base model's, at `hook`.
Every `every` steps the logger adds to the fit's metrics row (result.metrics and
metrics.csv): cos_with_teacher_vector, shift_norm and shift_norm_ratio (= |shift| / |v*|),
and keeps the same figures in `logger.history`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..hooks import record
from ..models import LoadedModel, unwrap

Positions = Literal["all", "last"]


def _model(m: LoadedModel | nn.Module) -> nn.Module:
    """The module to run: a PEFT model runs through its (LoRA-injected) base model."""
    m = unwrap(m)  # type: ignore[arg-type]
    get_base = getattr(m, "get_base_model", None)
    return get_base() if callable(get_base) else m


@torch.no_grad()
def mean_activation(
    model: LoadedModel | nn.Module,
    probe: Sequence[Sequence[int]],
    hook: str,
    positions: Positions = "all",
    batch_size: int = 16,
    pad_id: int = 0,
) -> torch.Tensor:
    """Mean activation [d] (float32, cpu) at `hook` over the probe prompts' real positions
    ("all": every token of every prompt counts once) or over their last tokens ("last")."""
    m = _model(model)
    dev = next(m.parameters()).device
    kw: dict[str, Any] = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(m.forward).parameters:
        kw["logits_to_keep"] = 1  # the read needs no logits
    total, count = None, 0
    was_training = m.training
    m.eval()
    try:
        for i in range(0, len(probe), batch_size):
            chunk = [list(p) for p in probe[i : i + batch_size]]
            lens = torch.tensor([len(p) for p in chunk])
            ids = torch.full((len(chunk), int(lens.max())), pad_id, dtype=torch.long)
            for j, p in enumerate(chunk):
                ids[j, : len(p)] = torch.tensor(p)
            real = torch.arange(ids.shape[1]).unsqueeze(0) < lens.unsqueeze(1)  # [b, s]
            with record(m, [hook]) as rec:
                m(input_ids=ids.to(dev), attention_mask=real.long().to(dev), **kw)
            acts = rec[hook].float().cpu()  # [b, s, d]
            if positions == "last":
                picked = acts[torch.arange(len(chunk)), lens - 1]  # [b, d]
            else:
                picked = acts[real]  # [n_real, d]
            s = picked.sum(0)
            total = s if total is None else total + s
            count += picked.shape[0]
    finally:
        m.train(was_training)
    if total is None:
        raise ValueError("mean_activation needs at least one probe prompt")
    return total / count


def activation_shift(
    student_model: LoadedModel | nn.Module,
    base_acts: torch.Tensor,
    probe: Sequence[Sequence[int]],
    hook: str,
    positions: Positions = "all",
    batch_size: int = 16,
    pad_id: int = 0,
) -> torch.Tensor:
    """The student's mean activation at `hook` on the probe minus the base model's
    (`base_acts` = mean_activation of the base model on the same probe and positions)."""
    acts = mean_activation(student_model, probe, hook, positions, batch_size, pad_id)
    return acts - base_acts.float().cpu()


def alignment_figures(shift: torch.Tensor, v_star: torch.Tensor) -> dict[str, float]:
    """cos(shift, v*), |shift| and |shift| / |v*| (cosine 0 for a zero shift)."""
    v = v_star.float().cpu()
    sn, vn = float(shift.norm()), float(v.norm())
    cos = float(shift @ v) / (sn * vn) if sn > 0 and vn > 0 else 0.0
    return {
        "cos_with_teacher_vector": cos,
        "shift_norm": sn,
        "shift_norm_ratio": sn / vn if vn > 0 else float("nan"),
    }


@dataclass
class AlignmentLogger:
    """An `on_step(step, row)` callback for fit / fit_lora / fit_full that adds the
    alignment columns to the metrics row every `every` steps.

    model: the module that runs the student. fit_lora and fit_full set it themselves
    (they call `watch(module)` with what they train); give it for anything else.
    base_acts: the base model's mean_activation on `probe` (computed by `watch` when None,
    so call watch before the student moves away from the base).
    """

    probe: Sequence[Sequence[int]]
    hook: str
    v_star: torch.Tensor
    base_acts: torch.Tensor | None = None
    every: int = 1
    positions: Positions = "all"
    batch_size: int = 16
    pad_id: int = 0
    model: Any = None
    history: list[dict[str, float]] = field(default_factory=list)

    def watch(self, model: LoadedModel | nn.Module) -> None:
        """Follow `model` (the module being trained); reads the base activations if needed."""
        self.model = model
        if self.base_acts is None:
            self.base_acts = self.mean(model)

    def mean(self, model: LoadedModel | nn.Module) -> torch.Tensor:
        return mean_activation(
            model, self.probe, self.hook, self.positions, self.batch_size, self.pad_id
        )

    def measure(self) -> dict[str, float]:
        """The alignment figures of the watched model now."""
        if self.model is None or self.base_acts is None:
            raise ValueError(
                "AlignmentLogger has no model to measure: pass model= and base_acts=, or "
                "call watch(model) before training"
            )
        shift = self.mean(self.model) - self.base_acts.float().cpu()
        return alignment_figures(shift, self.v_star)

    def __call__(self, step: int, row: dict) -> None:
        if step % self.every:
            return
        figs = self.measure()
        row.update(figs)
        self.history.append({"step": step, **figs})
