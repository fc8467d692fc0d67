"""A fit's data: dataset rows -> token-id Examples -> right-padded Batches, and the split.

rows (dataset JSONL, messages)  --tokenize_rows-->  Example (prompt ids, completion ids)
Examples                        --collate------->   Batch [batch, pos] + loss positions
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..chat import chat_prompt_ids, end_of_turn_ids
from ..generate import DatasetError, load_dataset
from ..models import LoadedModel
from ..teachers import Teacher, TeacherConfig
from .config import FitConfig, FitError

# what a fit accepts as its teacher: a built Teacher, its config, or a spec dict (manifests)
TeacherLike = Teacher | TeacherConfig | Mapping[str, Any] | None


@dataclass
class Example:
    """One training row as token ids.

    prompt_ids: what the student sees before the completion (chat template, no system prompt).
    completion_ids: the assistant tokens (loss is taken on these), incl. end-of-turn.
    teacher_prompt_ids: the teacher's prompt (e.g. with its system prompt); None = same.
    topk_ids / topk_logprobs: [len(completion_ids)][k] teacher top-k at each completion token.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    teacher_prompt_ids: list[int] | None = None
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    id: int | str | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def teacher_spec(teacher: TeacherLike) -> dict[str, Any]:
    """The teacher as a spec dict (what provenance and the vectors' metadata record)."""
    if isinstance(teacher, (Teacher, TeacherConfig)):
        return teacher.spec()
    return dict(teacher or {})


def read_rows(path: str | os.PathLike) -> tuple[list[dict], dict]:
    """Rows of a dataset JSONL and its manifest ({} if absent), via generate.load_dataset."""
    try:
        rows, manifest = load_dataset(path, require_complete=False)
    except DatasetError as e:
        raise FitError(str(e)) from e
    return rows, manifest


def _user_and_assistant(row: dict, i: int) -> tuple[list[dict], str]:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise FitError(f"Row {i} (id={row.get('id')}) has no 'messages' list.")
    assistant = [m for m in msgs if m.get("role") == "assistant"]
    if not assistant and not row.get("completion_ids"):
        raise FitError(
            f"Row {i} (id={row.get('id')}) has no assistant turn: nothing to train on. "
            "Each row needs messages [{'role':'user',...},{'role':'assistant',...}]."
        )
    context = [m for m in msgs if m.get("role") in ("user", "system")]
    if not any(m["role"] == "user" for m in context):
        raise FitError(f"Row {i} (id={row.get('id')}) has no user turn.")
    return context, assistant[-1]["content"] if assistant else ""


def tokenize_rows(
    tokenizer: Any, rows: Sequence[dict], teacher: TeacherLike = None
) -> list[Example]:
    """Rows (dataset format) -> Examples.

    Student prompt = chat template of the user message, add_generation_prompt=True, no
    system prompt (SmolLM2's template then inserts its default system prompt, exactly as
    the generator's student-side prompt). Teacher prompt = the same with the teacher's
    system prompt when the teacher is a prompt teacher ({"kind": "prompt", "system_prompt":
    ...}); a teacher's chat_template_kwargs apply to both.
    """
    if not rows:
        raise FitError("The dataset is empty: nothing to fit.")
    spec = teacher_spec(teacher)
    system = spec.get("system_prompt") if spec.get("kind") == "prompt" else None
    tkw = spec.get("chat_template_kwargs")
    eot: list[int] | None = None
    out = []
    for i, row in enumerate(rows):
        context, content = _user_and_assistant(row, i)
        user = [m for m in context if m["role"] == "user"]
        prompt_ids = chat_prompt_ids(tokenizer, user, tkw)
        teacher_ids = (
            chat_prompt_ids(tokenizer, [{"role": "system", "content": system}, *user], tkw)
            if system
            else None
        )
        comp = row.get("completion_ids")
        if not comp:
            if eot is None:
                eot = end_of_turn_ids(tokenizer)
            comp = tokenizer(content, add_special_tokens=False).input_ids + eot
        topk_ids, topk_lp = row.get("topk_ids"), row.get("topk_logprobs")
        if topk_ids is not None and len(topk_ids) != len(comp):
            raise FitError(
                f"Row {i}: {len(topk_ids)} top-k lists for {len(comp)} completion tokens."
            )
        out.append(Example(prompt_ids, list(comp), teacher_ids, topk_ids, topk_lp, row.get("id")))
    return out


def prepare_examples(
    lm: LoadedModel | nn.Module,
    data: str | os.PathLike | Sequence[dict] | Sequence[Example],
    teacher: TeacherLike = None,
    max_len: int | None = None,
) -> tuple[list[Example], dict]:
    """Path / rows / Examples -> (Examples, teacher spec: `teacher`'s, else the manifest's)."""
    manifest: dict = {}
    if isinstance(data, (str, os.PathLike)):
        data, manifest = read_rows(data)
    data = list(data)
    if not data:
        raise FitError("The dataset is empty: nothing to fit.")
    spec = teacher_spec(teacher if teacher is not None else manifest.get("teacher"))
    if isinstance(data[0], Example):
        examples = list(data)  # type: ignore[arg-type]
    else:
        tok = lm.tokenizer if isinstance(lm, LoadedModel) else None
        if tok is None:
            raise FitError("Rows of messages need a tokenizer: pass a LoadedModel (load_model()).")
        examples = tokenize_rows(tok, data, spec)  # type: ignore[arg-type]
    for i, ex in enumerate(examples):
        if not ex.completion_ids:
            raise FitError(f"Row {i} (id={ex.id}) has an empty completion: nothing to train on.")
        if not ex.prompt_ids:
            raise FitError(f"Row {i} (id={ex.id}) has an empty prompt.")
    if max_len is not None:
        examples = [ex for ex in examples if len(ex) <= max_len]
        if not examples:
            raise FitError(f"No row is at most max_len={max_len} tokens long.")
    return examples, spec


def split_examples(examples: list[Example], cfg: FitConfig) -> tuple[list[Example], list[Example]]:
    """Seeded train / validation split."""
    n = len(examples)
    n_val = cfg.val_size if cfg.val_size is not None else int(round(cfg.val_fraction * n))
    n_val = min(n_val, n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    val = [examples[i] for i in perm[:n_val]]
    train = [examples[i] for i in perm[n_val:]]
    return train, val


def pad_id_of(lm: LoadedModel | nn.Module) -> int:
    """The tokenizer's pad id (0 for a bare model or a tokenizer without one)."""
    tok = lm.tokenizer if isinstance(lm, LoadedModel) else None
    if tok is not None and tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    return 0


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@dataclass
class Batch:
    """Right-padded batch. Loss positions are those predicting a completion token."""

    input_ids: torch.Tensor  # [b, s]
    attention_mask: torch.Tensor  # [b, s]
    loss_mask: torch.Tensor  # [b, s] bool: position t predicts a completion token
    targets: torch.Tensor  # [n] next-token ids at the loss positions (row-major order)
    topk_ids: torch.Tensor | None = None  # [n, k]
    topk_logprobs: torch.Tensor | None = None  # [n, k]
    response_mask: torch.Tensor | None = None  # [b, s] bool: completion tokens as inputs

    @property
    def n_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor on `device` (the model's)."""
        moved = {
            k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()
        }
        return Batch(**moved)


def collate(examples: Sequence[Example], pad_id: int = 0, teacher: bool = False) -> Batch:
    """Examples -> Batch (teacher=True uses each example's teacher prompt)."""
    seqs, starts = [], []
    for ex in examples:
        prompt = ex.teacher_prompt_ids if (teacher and ex.teacher_prompt_ids) else ex.prompt_ids
        seqs.append(prompt + ex.completion_ids)
        starts.append(len(prompt))
    b, s = len(seqs), max(len(x) for x in seqs)
    input_ids = torch.full((b, s), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, s), dtype=torch.long)
    loss_mask = torch.zeros((b, s), dtype=torch.bool)
    response_mask = torch.zeros((b, s), dtype=torch.bool)
    for r, (seq, p) in enumerate(zip(seqs, starts, strict=True)):
        input_ids[r, : len(seq)] = torch.tensor(seq)
        attention_mask[r, : len(seq)] = 1
        loss_mask[r, p - 1 : len(seq) - 1] = True  # position t predicts token t+1
        response_mask[r, p : len(seq)] = True
    targets = torch.cat([torch.tensor(ex.completion_ids) for ex in examples])  # [n]
    topk_ids = topk_lp = None
    if all(ex.topk_ids is not None for ex in examples):
        topk_ids = torch.cat([torch.tensor(ex.topk_ids, dtype=torch.long) for ex in examples])
        topk_lp = torch.cat(
            [torch.tensor(ex.topk_logprobs, dtype=torch.float32) for ex in examples]
        )
    return Batch(input_ids, attention_mask, loss_mask, targets, topk_ids, topk_lp, response_mask)
