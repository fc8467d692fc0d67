"""Online distillation: the teacher's full next-token distribution, computed during the fit.

At every position t where the loss is taken (each completion token's prediction; with
`online_prompt_positions` also the prompt's):

    p_t = softmax(teacher logits at t)   the teacher on ITS prompt + the same completion
    q_t = softmax(student logits at t)   the student on its prompt + the completion
    KL_t(p || q) = sum_i p_t(i) * (log p_t(i) - log q_t(i))      over the full vocabulary

The teacher runs under no_grad (only log q carries a gradient), as a `teachers.Teacher`
of any kind: prompt (its system prompt in `Example.teacher_prompt_ids`), steered
(`Teacher.scoring` steers the positions it steered while writing), adapter. Unlike the
stored top-k log-probs ("distill"), nothing is truncated or renormalised, and the target
is the teacher's distribution itself, not one sample of it ("sft"): a student equal to
the teacher has KL 0 at every position, and the gradient there is 0.

Where the data was written under a decoding constraint, both distributions pass through
`_constrain` (renormalised over what the constraint allowed at that step) first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..replay import lm_head
from ..teachers import Teacher
from .config import FitError
from .data import Batch, Example, collate
from .losses import constrain as _constrain
from .losses import eval_losses, lm_of


@dataclass
class Target:
    """The teacher's side of one micro-batch."""

    logp: torch.Tensor  # [n, vocab] teacher log-probs at the KL positions (row-major)
    prompt_positions: bool = False  # KL positions: completion only, or prompt ones too


def kl_full(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position over the full vocabulary: [n, vocab] x 2 -> [n].

    Tokens a decoding constraint ruled out have log p = -inf (and log q = -inf): p = 0
    there, so they add nothing (written out, 0 * (-inf - -inf) would be NaN)."""
    diff = torch.where(torch.isfinite(log_p), log_p - log_q, 0.0)
    return (log_p.exp() * diff).sum(-1)


def kl_positions(batch: Batch, prompt_positions: bool) -> torch.Tensor:
    """[b, s] bool: where the KL is taken. Completion predictions (batch.loss_mask); with
    prompt_positions every position whose next token is a real token."""
    if not prompt_positions:
        return batch.loss_mask
    real = batch.attention_mask.bool()
    mask = torch.zeros_like(real)
    mask[:, :-1] = real[:, :-1] & real[:, 1:]  # position t predicts token t+1
    return mask


def constrained(logp: torch.Tensor, mask: torch.Tensor, batch: Batch) -> torch.Tensor:
    """`logp` [n, vocab] at `mask`'s positions with the completion predictions among them
    passed through the decoding constraint (prompt positions were not constrained)."""
    if torch.equal(mask, batch.loss_mask):
        return _constrain(logp, batch)  # the ONE call site of the constraint
    sel = batch.loss_mask[mask].nonzero()[:, 0]  # which of the n rows are completion ones
    return logp.index_put((sel,), _constrain(logp[sel], batch))


def check_prompt_positions(examples: Sequence[Example]) -> None:
    """FitError unless teacher and student see the same prompt tokens in every row (else
    the prompt positions of the two do not predict the same tokens)."""
    for i, ex in enumerate(examples):
        if ex.teacher_prompt_ids is not None and ex.teacher_prompt_ids != ex.prompt_ids:
            raise FitError(
                f"online_prompt_positions: row {i} (id={ex.id}) gives the teacher another "
                "prompt than the student (e.g. a system prompt), so their prompt positions "
                "predict different tokens. Set online_prompt_positions=False "
                "(--no-online-prompt-positions), or use a teacher that sees the student's "
                "prompt (steered, adapter)."
            )


class OnlineTeacher:
    """A Teacher that gives, for a micro-batch of Examples, its log-probs at the KL positions."""

    def __init__(self, teacher: Teacher, pad_id: int, prompt_positions: bool = False):
        self.teacher = teacher
        self.pad_id = pad_id
        self.prompt_positions = prompt_positions

    @torch.no_grad()
    def target(
        self, rows: Sequence[Example], device: torch.device, prompt_positions: bool | None = None
    ) -> Target:
        """The teacher's log-probs for `rows` (on its own prompts; same completions)."""
        at_prompt = self.prompt_positions if prompt_positions is None else prompt_positions
        if at_prompt:
            check_prompt_positions(rows)
        tb = collate(rows, self.pad_id, teacher=True).to(device)
        t = self.teacher
        with t.scoring(tb.response_mask, tb.attention_mask) as model:
            hidden = t.hidden_states(model, tb.input_ids, tb.attention_mask)  # [b, s, d]
            mask = kl_positions(tb, at_prompt)
            logp = torch.log_softmax(lm_head(lm_of(model), hidden[mask]).float(), dim=-1)
        return Target(constrained(logp, mask, tb), at_prompt)


def online_losses(
    model: nn.Module, hidden: torch.Tensor, batch: Batch, target: Target
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums [b] of the student's CE on the completion tokens and of
    KL(teacher || student) over the full vocabulary at the target's KL positions (the
    teacher's completion positions line up with the student's in row-major order: the
    same completions after prompts of other lengths).

    model: the module owning lm_head; hidden: the student's final-normed hidden [b, s, d].
    """
    mask = kl_positions(batch, target.prompt_positions)  # [b, s]
    row = mask.nonzero()[:, 0]  # [n] which row each KL position is in
    log_q = torch.log_softmax(lm_head(lm_of(model), hidden[mask]).float(), dim=-1)  # [n, V]
    log_q = constrained(log_q, mask, batch)
    kl_tok = kl_full(target.logp.to(log_q.device), log_q)  # [n]
    sel = batch.loss_mask[mask]  # [n] bool: completion predictions (those have targets)
    ce_tok = -log_q[sel].gather(1, batch.targets[:, None].to(log_q.device))[:, 0]
    zeros = torch.zeros(hidden.shape[0], device=hidden.device)
    ce = zeros.index_add(0, row[sel], ce_tok)
    kl = zeros.index_add(0, row, kl_tok)
    return ce, kl


LossFn = Callable[[Batch, Any, Target], tuple[torch.Tensor, torch.Tensor]]


def online_eval(
    module: nn.Module,
    examples: Sequence[Example],
    teacher: OnlineTeacher,
    losses: LossFn,
    batch_size: int,
    pad_id: int,
    desc: str | None = None,
) -> dict[str, Any]:
    """`eval_losses` whose KL is the online KL at the completion positions: "kl" (mean per
    completion token) and rows[:, 1] (per row sums, for the bootstrap intervals).

    losses(batch, batch index, target) -> per-row (CE, KL) of the model being evaluated."""

    def loss_fn(batch: Batch, bi: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = examples[bi * batch_size : (bi + 1) * batch_size]
        target = teacher.target(rows, batch.input_ids.device, prompt_positions=False)
        return losses(batch, bi, target)

    out = eval_losses(module, examples, batch_size, pad_id, loss_fn=loss_fn, desc=desc)
    sums = out["rows"].sum(0)
    out["kl"] = float(sums[1]) / max(float(sums[2]), 1.0)
    return out
