"""A fit's data: dataset rows -> token-id Examples -> right-padded Batches, and the split.

rows (JSONL file, hf:ORG/NAME, or a list)  --prepare_examples-->  Example (prompt ids,
                                            completion ids, loss mask over the completion)
Examples                        --collate------->   Batch [batch, pos] + loss positions
The three row formats (chat messages, prompt/completion, text documents): fit.formats.
(+ the ids a dataset's decoding constraint allowed at each loss position: fit.constrained)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models import LoadedModel
from ..teachers import Teacher, TeacherConfig, build_teacher
from .config import FitConfig, FitError
from .constrained import add_allowed, collate_allowed, data_constraint, pad_topk
from .formats import (
    MESSAGES,
    TEXT,
    check_document,
    check_row,
    check_same_format,
    detect_format,
    document_chunks,
    prompt_tokens,
    tokenize_conversation,
)
from .rows import Rows, provenance_of, read_rows  # (Rows, read_rows: fit API)

# what a fit accepts as its teacher: a built Teacher, its config, or a spec dict (manifests)
TeacherLike = Teacher | TeacherConfig | Mapping[str, Any] | None


@dataclass
class Example:
    """One training row as token ids.

    prompt_ids: what the student sees before the completion (chat template, no system prompt).
    completion_ids: the assistant tokens (loss is taken on these), incl. end-of-turn.
    teacher_prompt_ids: the teacher's prompt (e.g. with its system prompt); None = same.
    topk_ids / topk_logprobs: [len(completion_ids)][k] teacher top-k at each completion token
      (a log-prob of -inf marks padding: a step whose distribution had fewer than k tokens).
    allowed: [len(completion_ids)] the token ids the data's decoding constraint allowed at
      each completion token (None: unconstrained scoring).
    loss_mask: [len(completion_ids)] which completion tokens are trained (a multi-turn chat:
      the assistant turns, not the user turns between them); None = every one. Top-k and
      `allowed` stay over all completion tokens; `collate` keeps the trained ones.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    teacher_prompt_ids: list[int] | None = None
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    id: int | str | None = None
    allowed: list[list[int]] | None = None
    loss_mask: list[bool] | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def n_loss(self) -> int:
        """How many completion tokens carry a loss."""
        return len(self.completion_ids) if self.loss_mask is None else sum(self.loss_mask)

    def trained(self, values: Sequence[Any]) -> list[Any]:
        """The items of a per-completion-token list at the trained tokens."""
        mask = self.loss_mask or [True] * len(values)
        return [v for v, keep in zip(values, mask, strict=True) if keep]


def teacher_spec(teacher: TeacherLike) -> dict[str, Any]:
    """The teacher as a spec dict (what provenance and the vectors' metadata record)."""
    if isinstance(teacher, (Teacher, TeacherConfig)):
        return teacher.spec()
    return dict(teacher or {})


def ids_decode_to_text(tokenizer: Any, rows: Sequence[dict], texts: Sequence[str]) -> list[bool]:
    """Per row with completion_ids: do they (without the end-of-turn token) decode to the
    assistant text under `tokenizer`? The generator writes text = decode(ids[:-1]), so with
    the tokenizer that sampled them they always do; with another model's they do not."""
    return [
        tokenizer.decode(r["completion_ids"][:-1], skip_special_tokens=False) == t
        for r, t in zip(rows, texts, strict=True)
        if r.get("completion_ids") and t
    ]


def foreign_ids(tokenizer: Any, data: Rows, texts: Sequence[str]) -> bool:
    """True when the rows' completion_ids are another tokenizer's (none decodes to its text).

    A few rows that do not decode among many that do is a broken dataset, not another
    tokenizer: FitError naming the first such row.
    """
    ok = ids_decode_to_text(tokenizer, data.rows, texts)
    if not ok or all(ok):
        return False
    if sum(ok) * 2 < len(ok):
        return True
    checked = [i for i, r in enumerate(data.rows) if r.get("completion_ids") and texts[i]]
    bad = checked[ok.index(False)]
    raise FitError(
        f"{data.where(bad)}: its completion_ids do not decode to its assistant content under "
        f"the student's tokenizer ({len(ok) - sum(ok)} of {len(ok)} rows); fix those rows or "
        "drop their 'completion_ids' (the text is then tokenized)."
    )


def tokenize_rows(
    tokenizer: Any,
    rows: Sequence[dict] | Rows,
    teacher: TeacherLike = None,
    notes: list[str] | None = None,
    constrained_topk: bool = False,
    fmt: str = MESSAGES,
) -> list[Example]:
    """Chat rows ({"messages"} or, with fmt="prompt_completion", {"prompt", "completion"})
    -> Examples (fit.formats.tokenize_conversation).

    Student prompt = chat template of the messages before the first trained assistant
    turn, add_generation_prompt=True; no system prompt of ours (SmolLM2's template then
    inserts its default, exactly as the generator's student-side prompt). Teacher prompt =
    the same with the teacher's system prompt when the teacher is a prompt teacher
    ({"kind": "prompt", "system_prompt": ...}); a teacher's chat_template_kwargs apply to both.

    Completion = the row's completion_ids (the teacher's sampled ids: the last assistant
    turn), or every assistant turn tokenized + end-of-turn, with the turns between them as
    untrained context (Example.loss_mask). When the completion_ids are another model's token ids (they do
    not decode to the text under `tokenizer`: a student of another family), the text is
    tokenized instead and the top-k log-probs (over the other vocabulary) dropped; a line
    saying so is added to `notes`. Bad rows raise FitError naming the file and line.
    constrained_topk: take the rows' topk_ids / topk_logprobs (under constrained decoding:
    the distribution sampled from) as they are; False: their topk_*_unconstrained when
    present (the full distribution's). Top-k lists of unequal length are padded (`pad_topk`).
    """
    data = rows if isinstance(rows, Rows) else Rows(list(rows))
    if not data.rows:
        raise FitError(f"The dataset ({data.source}) is empty: nothing to fit.")
    spec = teacher_spec(teacher)
    system = spec.get("system_prompt") if spec.get("kind") == "prompt" else None
    tkw = spec.get("chat_template_kwargs")
    checked = [check_row(data, i, fmt) for i in range(len(data.rows))]
    texts = [content for _, content in checked]
    if all(
        not t.strip() and len(r.get("completion_ids") or []) <= 1
        for r, t in zip(data.rows, texts, strict=True)
    ):
        raise FitError(
            f"Every assistant message in {data.source} is empty ({len(texts)} rows): the fit "
            "would learn only the end-of-turn token. Check how the data was made."
        )
    retokenize = foreign_ids(tokenizer, data, texts)
    if retokenize and notes is not None:
        made_by = (data.manifest.get("provenance") or {}).get("model_id")
        notes.append(
            "the rows' completion_ids are another tokenizer's token ids"
            + (f" (the data was made by {made_by})" if made_by else "")
            + ": the assistant text was tokenized for the student instead, and the top-k "
            "log-probs (over the other vocabulary) were dropped"
        )
    out = []
    for i, (row, (conv, _)) in enumerate(zip(data.rows, checked, strict=True)):
        comp = None if retokenize else row.get("completion_ids")
        mask = None
        if comp:
            before = conv.messages[: conv.trained[0]] if conv.trained else conv.messages
            prompt_ids, teacher_ids = prompt_tokens(tokenizer, before, tkw, system)
        else:
            try:
                t = tokenize_conversation(tokenizer, conv, tkw, system)
            except FitError as e:
                raise FitError(f"{data.where(i)}: {e}") from None
            prompt_ids, comp, mask, teacher_ids = (
                t.prompt_ids,
                t.completion_ids,
                t.loss_mask,
                t.teacher_prompt_ids,
            )
        which = "" if constrained_topk or "topk_ids_unconstrained" not in row else "_unconstrained"
        topk_ids, topk_lp = row.get("topk_ids" + which), row.get("topk_logprobs" + which)
        if topk_ids is not None and topk_lp is not None:
            topk_ids, topk_lp = pad_topk(topk_ids, topk_lp)
        if retokenize:
            topk_ids = topk_lp = None
        if topk_ids is not None and len(topk_ids) != len(comp):
            raise FitError(
                f"{data.where(i)}: {len(topk_ids)} top-k lists for {len(comp)} completion tokens."
            )
        ex = Example(prompt_ids, list(comp), teacher_ids, topk_ids, topk_lp, row.get("id"))
        ex.loss_mask = mask
        out.append(ex)
    return out


def tokenize_documents(
    tokenizer: Any, data: Rows, max_len: int | None
) -> tuple[list[Example], int]:
    """{"text"} rows -> Examples, one per chunk of at most max_len tokens (fit.formats.
    document_chunks: every token of each document is trained, none dropped), and how many
    documents were split into more than one chunk."""
    out, split = [], 0
    for i in range(len(data.rows)):
        chunks = document_chunks(tokenizer, check_document(data, i), max_len)
        split += len(chunks) > 1
        rid = data.rows[i].get("id", i)
        for j, (prompt, comp) in enumerate(chunks):
            out.append(Example(prompt, comp, id=rid if len(chunks) == 1 else f"{rid}/{j}"))
    if not out:
        raise FitError(f"The documents of {data.source} have no token to train on.")
    return out, split


@dataclass
class Prepared:
    """What `prepare_examples` gives: Examples, the teacher spec and what a fit should say."""

    examples: list[Example]
    teacher: dict  # `teacher`'s spec, else the manifest's
    manifest: dict = field(default_factory=dict)
    source: str = "the rows given"
    notes: list[str] = field(default_factory=list)  # one line each; printed and recorded
    retokenized: bool = False  # completion_ids were another tokenizer's (see tokenize_rows)
    constrained: bool = False  # Examples carry `allowed`: scored under the data's constraint
    data: dict = field(default_factory=dict)  # data_provenance: format, sha256, counts, source


def as_rows(data: str | os.PathLike | Rows | Sequence[Any]) -> Rows:
    """A path or "hf:..." (read), Rows (as they are) or a list of rows / Examples."""
    if isinstance(data, Rows):
        return data
    return read_rows(data) if isinstance(data, (str, os.PathLike)) else Rows(list(data))


def prepare_examples(
    lm: LoadedModel | nn.Module,
    data: str | os.PathLike | Rows | Sequence[dict] | Sequence[Example],
    teacher: TeacherLike = None,
    max_len: int | None = None,
    constrained_scoring: bool = True,
) -> Prepared:
    """Path / "hf:ORG/NAME[:split]" / rows / Examples -> Prepared (Examples, teacher spec:
    `teacher`'s, else the manifest's, notes such as re-tokenized completions, and the
    data's provenance).

    The rows' format is detected per file (fit.formats): chat messages (every assistant
    turn trained), prompt/completion (the completion trained), or text documents (every
    token trained, chunked to max_len). Chat rows longer than max_len are dropped (a note
    says how many); documents are split, never dropped.
    constrained_scoring: when the manifest records a decoding constraint, give each Example
    the ids it allowed at each completion token and the top-k of the distribution sampled
    from (see fit.losses.constrain); False: the full distribution's top-k and no `allowed`."""
    rows = as_rows(data)
    if not rows.rows:
        raise FitError("The dataset is empty: nothing to fit.")
    spec = teacher_spec(teacher if teacher is not None else rows.manifest.get("teacher"))
    if spec.get("kind") == "prompt" and not spec.get("system_prompt"):
        spec = build_teacher(spec, lm).spec()  # {"animal": "owl"} -> its system prompt
    notes: list[str] = []
    retokenized = False
    fmt, n_split = "examples", 0
    if isinstance(rows.rows[0], Example):
        examples = list(rows.rows)
    else:
        tok = lm.tokenizer if isinstance(lm, LoadedModel) else None
        if tok is None:
            raise FitError("Rows of messages need a tokenizer: pass a LoadedModel (load_model()).")
        fmt = detect_format(rows.rows, rows.where)
        if fmt != MESSAGES:  # (a messages file's odd rows fail its row checks, by line)
            check_same_format(rows.rows, fmt, rows.where)
        if fmt == TEXT:
            examples, n_split = tokenize_documents(tok, rows, max_len)
        else:
            steps = (
                data_constraint(rows.manifest, tok, rows.source, notes)
                if constrained_scoring
                else None
            )
            n_notes = len(notes)
            examples = tokenize_rows(tok, rows, spec, notes, steps is not None, fmt)
            retokenized = len(notes) > n_notes  # tokenize_rows notes only that
            if steps is not None and not retokenized:  # (another tokenizer's constraint)
                add_allowed(examples, steps, rows.where)
    for i, ex in enumerate(examples):
        if not ex.completion_ids:
            raise FitError(f"{rows.where(i)} has an empty completion: nothing to train on.")
        if not ex.prompt_ids:
            raise FitError(f"{rows.where(i)} has an empty prompt.")
    n_made = len(examples)
    if max_len is not None:
        examples = [ex for ex in examples if len(ex) <= max_len]
        if not examples:
            raise FitError(f"No row of {rows.source} is at most max_len={max_len} tokens long.")
        if len(examples) < n_made:
            notes.append(
                f"{n_made - len(examples)} of {n_made} rows are longer than max_len={max_len} "
                "tokens and were left out"
            )
    constrained = all(ex.allowed is not None for ex in examples)
    prov = provenance_of(rows, fmt, len(examples), n_split if fmt == TEXT else 0)
    return Prepared(
        examples, spec, rows.manifest, rows.source, notes, retokenized, constrained, prov
    )


def data_provenance(
    data: str | os.PathLike | Rows | Sequence[dict] | Sequence[Example],
    lm: LoadedModel | None = None,
    max_len: int | None = None,
) -> dict:
    """Where a fit's data came from, for its outputs ("data" in result.json and in the
    vectors' metadata): {"format" (messages | prompt_completion | text | examples),
    "sha256" (of the file; of the rows as canonical JSON lines when given in memory or from
    the hub), "rows", "examples" (what the fit trains on, after chunking and the max_len
    filter), "chunks" (documents: how many were split into more than one chunk), "source"
    (the path or "hf:ORG/NAME:split"), "manifest" (does it have a steerdiff manifest)}.
    Without `lm` the data is not tokenized: "examples" and "chunks" are None."""
    if lm is not None:
        return prepare_examples(lm, data, max_len=max_len).data
    rows = as_rows(data)
    if rows.rows and isinstance(rows.rows[0], Example):
        return provenance_of(rows, "examples", len(rows.rows), 0)
    fmt = detect_format(rows.rows, rows.where) if rows.rows else "empty"
    if fmt not in (MESSAGES, "empty"):
        check_same_format(rows.rows, fmt, rows.where)
    return provenance_of(rows, fmt, None, None)


def resolve_objective(
    cfg: FitConfig, examples: list[Example], retokenized: bool
) -> tuple[str, str]:
    """(the objective, why) for `cfg.objective` on these examples; FitError for distillation
    without top-k log-probs (before any scoring, not at the first step)."""
    have = sum(ex.topk_ids is not None for ex in examples)
    if cfg.objective == "auto":
        if have == len(examples):
            return "distill", " (auto: every row carries the teacher's top-k log-probs)"
        return "sft", " (auto: the rows carry no top-k log-probs)"
    if cfg.objective == "distill" and have < len(examples):
        why = (
            "the data's top-k log-probs are over another model's vocabulary and were dropped"
            if retokenized
            else f"{len(examples) - have} of {len(examples)} rows carry no top-k log-probs"
        )
        raise FitError(
            f"objective 'distill' needs the teacher's top-k log-probs in every row: {why}. "
            "Use objective 'sft' (--objective sft), or regenerate the data with --topk "
            "(or add them with annotate_topk())."
        )
    return cfg.objective, ""


def wants_validation(cfg: FitConfig) -> bool:
    """Does `cfg` ask for validation rows (val_size or val_fraction above 0)?"""
    return (cfg.val_size if cfg.val_size is not None else cfg.val_fraction) > 0


def split_examples(examples: list[Example], cfg: FitConfig) -> tuple[list[Example], list[Example]]:
    """Seeded train / validation split: at least 1 validation row when validation is asked
    for, and at least 1 training row."""
    n = len(examples)
    n_val = cfg.val_size if cfg.val_size is not None else int(round(cfg.val_fraction * n))
    if wants_validation(cfg):
        n_val = max(n_val, 1)
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
    allowed_ids: torch.Tensor | None = None  # [n, m] ids the constraint allowed (padded)
    allowed_mask: torch.Tensor | None = None  # [n, m] bool: a real entry, not padding
    # [b] CE under the full distribution, set by token_losses when it scores constrained
    ce_unconstrained: torch.Tensor | None = None

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
    for r, (seq, p, ex) in enumerate(zip(seqs, starts, examples, strict=True)):
        input_ids[r, : len(seq)] = torch.tensor(seq)
        attention_mask[r, : len(seq)] = 1
        loss_mask[r, p - 1 : len(seq) - 1] = True  # position t predicts token t+1
        if ex.loss_mask is not None:  # only the trained completion tokens
            loss_mask[r, p - 1 : len(seq) - 1] = torch.tensor(ex.loss_mask, dtype=torch.bool)
        response_mask[r, p : len(seq)] = True

    def trained(values: Any, ex: Example, dtype: torch.dtype) -> torch.Tensor:
        t = torch.as_tensor(values, dtype=dtype)  # [completion tokens, ...] -> the trained
        return t if ex.loss_mask is None else t[torch.tensor(ex.loss_mask, dtype=torch.bool)]

    targets = torch.cat([trained(ex.completion_ids, ex, torch.long) for ex in examples])  # [n]
    topk_ids = topk_lp = None
    if all(ex.topk_ids is not None for ex in examples):
        topk_ids = torch.cat([trained(ex.topk_ids, ex, torch.long) for ex in examples])
        topk_lp = torch.cat([trained(ex.topk_logprobs, ex, torch.float32) for ex in examples])
    return Batch(input_ids, attention_mask, loss_mask, targets, topk_ids, topk_lp,
                 response_mask, *collate_allowed(examples))  # fmt: skip
