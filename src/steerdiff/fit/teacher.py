"""The teacher inside a fit: one `teachers.Teacher`, built once, scores the validation rows
(the teacher's loss, for the gap closed) and can write top-k log-probs into Examples.

The teacher scores its own prompt (`Example.teacher_prompt_ids`, e.g. with its system
prompt) + the completion, under `Teacher.scoring(completion_mask, attention_mask)`, so a
steered teacher steers exactly the positions it steered while generating. The tokens all
rows of a batch start with (chat template, system prompt) run once per batch
(`Teacher.hidden_states`), except for a teacher steered at positions other than "all"
("prompt" / "response" steer through a mask over whole rows, and "first:k" counts
positions in the model's forward, which these passes of the decoder stack skip).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..models import LoadedModel, unwrap
from ..replay import lm_head
from ..teachers import Teacher, build_teacher
from .data import Batch, Example, TeacherLike, collate, device_of, pad_id_of, teacher_spec
from .losses import eval_losses, lm_of, token_losses


def as_teacher(teacher: TeacherLike, lm: LoadedModel | nn.Module) -> Teacher:
    """A Teacher as it is, or one built on `lm` from a TeacherConfig / spec (no kind: plain)."""
    if isinstance(teacher, Teacher):
        return teacher
    return build_teacher({"kind": "plain", **teacher_spec(teacher)}, lm)


def online_problem(teacher: TeacherLike, examples: list[Example]) -> str | None:
    """Why objective "online" cannot run with this teacher on these rows (None: it can).

    It needs a teacher on the student's model that differs from it: steered, adapter, or a
    prompt teacher whose rows carry its prompt (`Example.teacher_prompt_ids`)."""
    kind = teacher.kind if isinstance(teacher, Teacher) else teacher_spec(teacher).get("kind")
    if kind in (None, "plain"):
        return (
            "there is none (the data's manifest names no teacher, a plain one, or one on "
            "another model)"
        )
    if kind == "prompt" and not any(ex.teacher_prompt_ids for ex in examples):
        return "the prompt teacher's rows carry no teacher prompt (its system prompt)"
    return None


def teacher_losses(teacher: Teacher, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (CE, KL) of the teacher on a teacher-prompted batch (`collate(teacher=True)`)."""
    with teacher.scoring(batch.response_mask, batch.attention_mask) as model:
        hidden = teacher.hidden_states(model, batch.input_ids, batch.attention_mask)
        return token_losses(lm_of(model), hidden, batch, "sft")


def reference_losses(
    lm: LoadedModel | nn.Module,
    val: list[Example],
    teacher: TeacherLike,
    batch_size: int,
    show_progress: bool = False,
) -> tuple[dict, dict | None]:
    """Validation losses of the base model and of the teacher on the same completions.

    The teacher's is None for a plain teacher, and for a prompt teacher whose rows carry
    no teacher prompt (Examples made without its system prompt). show_progress: a bar (or
    plain lines in a log file) per model, since on a large model this takes minutes.
    """
    model, pad = unwrap(lm), pad_id_of(lm)
    desc = "base model on validation rows" if show_progress else None
    base_val = eval_losses(model, val, batch_size, pad, desc=desc)
    kind = teacher_spec(teacher).get("kind", "plain")
    if kind == "plain" or (kind == "prompt" and not any(ex.teacher_prompt_ids for ex in val)):
        return base_val, None
    t = as_teacher(teacher, lm)
    teacher_val = eval_losses(
        t.lm.model,
        val,
        batch_size,
        pad,
        teacher=True,
        loss_fn=lambda b, _: teacher_losses(t, b),
        desc="teacher on validation rows" if show_progress else None,
    )
    return base_val, teacher_val


@torch.no_grad()
def annotate_topk(
    lm: LoadedModel | nn.Module,
    examples: list[Example],
    teacher: TeacherLike,
    k: int = 20,
    batch_size: int = 16,
) -> list[Example]:
    """Fill topk_ids / topk_logprobs from a teacher forward (for data made without them)."""
    t, pad = as_teacher(teacher, lm), pad_id_of(lm)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        # top-k at EVERY completion token (collate keeps the trained ones: Example.loss_mask)
        every = [replace(ex, loss_mask=None) for ex in chunk]
        batch = collate(every, pad, teacher=True).to(device_of(t.lm.model))
        with t.scoring(batch.response_mask, batch.attention_mask) as model:
            h = t.hidden_states(model, batch.input_ids, batch.attention_mask)  # [b, s, d]
            h = h[batch.loss_mask]  # [n, d]
            logp = torch.log_softmax(lm_head(lm_of(model), h).float(), dim=-1)  # [n, vocab]
        top = logp.topk(min(k, logp.shape[-1]), dim=-1)
        j = 0
        for ex in chunk:
            n = len(ex.completion_ids)
            ex.topk_ids = top.indices[j : j + n].tolist()
            ex.topk_logprobs = top.values[j : j + n].tolist()
            j += n
    return examples
