"""Fit a VectorSet to a dataset: steering-vector distillation with all model weights frozen.

    student(x) = base model + trainable vectors added at the chosen hook points (all positions)

Two objectives, both on the assistant (completion) tokens only:

    sft:     CE     = -log p_student(y_t | y_<t, prompt)
    distill: KL_t   = sum_{i in topk_t} p_T(i) (log p_T(i) - log q_S(i))
             where p_T = softmax(teacher top-k log-probs) and q_S = the student's
             probabilities renormalised over the same k token ids.

Speed: when every trainable hook is at or after layer L, the activations below L do
not depend on the vectors. We run layers 0..L-1 once without gradients, keep
blocks.{L}.hook_resid_pre (and the exact arguments the HF model passes to each later
decoder layer: causal masks, rotary cos/sin, position ids), and each step runs only
blocks L.. with gradients. For a fixed dataset the cache is kept across epochs.

Data parallel: launch with `accelerate launch` / torchrun; each rank takes every
world_size-th micro-batch of a step, gradients are summed with all_reduce, so the
result equals a single-process run (up to float summation order).
"""

from __future__ import annotations

import contextlib
import csv
import io as _io
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from ..chat import chat_prompt_ids, end_of_turn_ids
from ..errors import SteerdiffError
from ..hooks import (
    HookError,
    family_of,
    get_hook_point,
    select_hooks,
    steer,
)
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text, provenance, read_jsonl
from ..models import LoadedModel, unwrap
from ..replay import Prefix, compute_prefix, full_hidden, lm_head, prefix_hidden
from ..vectors import VectorSet


class FitError(SteerdiffError, ValueError):
    """Bad data, bad config, or a fit that had to stop; the message says what to do."""


# ============================================================================ data


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


def load_dataset(path: str | os.PathLike) -> tuple[list[dict], dict]:
    """Rows of a dataset JSONL and its manifest (`<name>.manifest.json`, {} if absent)."""
    path = Path(path)
    if not path.exists():
        raise FitError(f"Dataset not found: {path}")
    rows = list(read_jsonl(path))
    if not rows:
        raise FitError(f"Dataset {path} is empty: nothing to fit. Generate data first.")
    manifest_path = path.with_name(path.name.removesuffix(".jsonl") + ".manifest.json")
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
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
    tokenizer: Any, rows: Sequence[dict], teacher: dict | None = None
) -> list[Example]:
    """Rows (dataset format) -> Examples.

    Student prompt = chat template of the user message, add_generation_prompt=True, no
    system prompt (SmolLM2's template then inserts its default system prompt, exactly as
    the generator's student-side prompt). Teacher prompt = the same with the teacher's
    system prompt when the teacher spec is {"kind": "prompt", "system_prompt": ...}.
    """
    if not rows:
        raise FitError("The dataset is empty: nothing to fit.")
    teacher = teacher or {}
    system = teacher.get("system_prompt") if teacher.get("kind") == "prompt" else None
    tkw = teacher.get("chat_template_kwargs")
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


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


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


# ============================================================================ teachers


@contextmanager
def teacher_context(lm: LoadedModel | nn.Module, spec: dict | None) -> Iterator[nn.Module]:
    """Under this block, the yielded module behaves as the teacher on teacher-prompted batches.

    {"kind": "plain"} / {"kind": "prompt", ...}: the base model (a system prompt changes the
    prompt tokens, see `tokenize_rows`); {"kind": "steered", "vectors": path or mapping,
    "coeff": c, "positions": p}: the base model steered; {"kind": "adapter", "path": dir}:
    the base model with a PEFT adapter (removed on exit).
    """
    model = unwrap(lm)
    kind = (spec or {}).get("kind", "plain")
    if kind in ("plain", "prompt"):
        yield model
    elif kind == "steered":
        vecs = spec["vectors"]
        if isinstance(vecs, (str, os.PathLike)):
            vecs = VectorSet.load(vecs)
        positions = spec.get("positions", "all")
        if positions == "all":
            with steer(model, vecs, coeff=float(spec.get("coeff", 1.0))):
                yield model
        else:  # positions need the batch; the caller passes them via _steer_positions
            yield _PositionalSteer(model, vecs, float(spec.get("coeff", 1.0)), positions)
    elif kind == "adapter" and isinstance(lm, LoadedModel):
        from ..teachers import build_teacher  # the generator's loader (PEFT or full folder)

        yield build_teacher(spec, lm).lm.model  # type: ignore[arg-type]
    elif kind == "adapter":
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, spec["path"])
        try:
            yield peft_model
        finally:
            peft_model.unload()
    else:
        raise FitError(f"Unknown teacher kind {kind!r}; use plain, prompt, steered or adapter.")


class _PositionalSteer(nn.Module):
    """A steered teacher whose positions ('prompt', 'response', 'first:k') depend on the batch."""

    def __init__(self, model: nn.Module, vectors: Any, coeff: float, positions: str):
        super().__init__()
        self.inner, self.vectors, self.coeff, self.positions = model, vectors, coeff, positions

    def steered(self, batch: Batch) -> contextlib.AbstractContextManager:
        pos: Any = self.positions
        if pos == "response":
            pos = batch.response_mask
        elif pos == "prompt":
            pos = ~batch.response_mask & batch.attention_mask.bool()
        return steer(self.inner, self.vectors, self.coeff, positions=pos)


# ============================================================================ forward passes


def token_losses(
    model: nn.Module, hidden: torch.Tensor, batch: Batch, objective: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums over loss tokens of CE and of top-k KL (zeros without top-k data).

    hidden: [b, s, d]. Returns two [b] tensors; training sums them over the batch,
    evaluation keeps them per row (for bootstrap intervals over validation rows).
    """
    h = hidden[batch.loss_mask]  # [n, d] (row-major, matches batch.targets)
    row = batch.loss_mask.nonzero()[:, 0].to(h.device)  # [n] which row each token is in
    logp = torch.log_softmax(lm_head(model, h).float(), dim=-1)  # [n, vocab]
    ce_tok = -logp.gather(1, batch.targets[:, None].to(h.device))[:, 0]  # [n]
    zeros = torch.zeros(hidden.shape[0], device=h.device)
    ce = zeros.index_add(0, row, ce_tok)
    kl = zeros
    if objective == "distill" or batch.topk_ids is not None:
        if batch.topk_ids is None:
            raise FitError(
                "objective='distill' needs top-k teacher log-probs (topk_ids, topk_logprobs) "
                "in every row; regenerate the data with top-k, or use annotate_topk()."
            )
        ids = batch.topk_ids.to(h.device)  # [n, k]
        log_pt = torch.log_softmax(batch.topk_logprobs.to(h.device), dim=-1)  # [n, k]
        log_qs = torch.log_softmax(logp.gather(1, ids), dim=-1)  # [n, k] renormalised
        kl = zeros.index_add(0, row, (log_pt.exp() * (log_pt - log_qs)).sum(-1))
    return ce, kl


# ============================================================================ config


class FitConfig(BaseModel):
    """How to fit. Hooks are patterns for `select_hooks` (globs, braces, layer ranges)."""

    model_config = ConfigDict(extra="forbid")

    hooks: list[str] = ["blocks.*.attn.hook_{q,k,v}"]
    objective: Literal["sft", "distill"] = "sft"
    optimizer: Literal["adam", "adamw", "sgd", "signsgd"] = "adam"
    lr: float = 1e-2
    momentum: float = 0.0  # sgd / signsgd
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    init: Literal["zero", "random"] = "zero"
    init_scale: float = 0.01  # std of the seeded random init
    max_norm: float | None = None  # cap on each vector's L2 norm after every step
    grad_clip: float | None = None
    epochs: int = 1
    max_steps: int | None = None  # stops earlier than epochs if set
    batch_size: int = 16  # rows per optimizer step (global, over all ranks)
    micro_batch_size: int | None = None  # rows per forward; < batch_size = grad accumulation
    val_fraction: float = 0.1
    val_size: int | None = None  # overrides val_fraction
    eval_every: int = 0  # steps; 0 = at the end of every epoch
    early_stopping_patience: int | None = None  # evals without improvement before stopping
    checkpoint_every: int = 50
    cache_prefix: bool = True  # run layers below the first trainable hook once per batch
    cache_across_epochs: bool = True
    max_len: int | None = None  # drop rows longer than this (tokens)
    seed: int = 0
    progress: bool = True

    @field_validator("batch_size", "epochs")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v


@dataclass
class FitResult:
    vectors: VectorSet | None  # None for baselines (see baselines.FinetuneResult)
    metrics: list[dict]
    base_val_loss: float | None
    teacher_val_loss: float | None
    fitted_val_loss: float | None
    gap_closed: float | None
    steps: int
    stopped: str  # "done" | "max_steps" | "early_stopping"
    out_dir: Path | None = None
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "base_val_loss": self.base_val_loss,
            "teacher_val_loss": self.teacher_val_loss,
            "fitted_val_loss": self.fitted_val_loss,
            "gap_closed": self.gap_closed,
            "steps": self.steps,
            "stopped": self.stopped,
            **self.extra,
        }


def gap_closed(base: float | None, fitted: float | None, teacher: float | None) -> float | None:
    """(base - fitted) / (base - teacher): 1.0 = as good as the teacher on its own data."""
    if base is None or fitted is None or teacher is None or abs(base - teacher) < 1e-12:
        return None
    return (base - fitted) / (base - teacher)


# ============================================================================ optimizers


class SignSGD(torch.optim.Optimizer):
    """p -= lr * sign(m), m = momentum * m + g (signum; plain signSGD with momentum=0)."""

    def __init__(self, params: Any, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["momentum"]:
                    buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(g)
                    g = buf
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(g), alpha=-group["lr"])


def make_optimizer(params: list[torch.Tensor], cfg: FitConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return SignSGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, cfg: FitConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warmup, then decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    done = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    done = min(max(done, 0.0), 1.0)
    if cfg.schedule == "linear":
        return 1.0 - done
    return 0.5 * (1.0 + math.cos(math.pi * done))


# ============================================================================ students


class Student:
    """What is trained: parameters, how to compute its losses on a batch, how to be it."""

    params: dict[str, torch.Tensor]

    def losses(self, batch: Batch, key: Any, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        raise NotImplementedError
        yield

    def release_cache(self) -> None:
        pass


class VectorStudent(Student):
    """Base model + trainable vectors at hook points (weights frozen)."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], cfg: FitConfig):
        self.model = model
        self.params = params
        layers = [get_hook_point(model, n).layer for n in params]
        self.start = min(layers) if cfg.cache_prefix else None
        self.keep_cache = cfg.cache_across_epochs
        self.cache: dict[Any, Prefix] = {}

    def prefix(self, batch: Batch, key: Any) -> Prefix:
        assert self.start is not None
        if key is not None and key in self.cache:
            return self.cache[key]
        p = compute_prefix(self.model, batch.input_ids, batch.attention_mask, self.start)
        if key is not None and self.keep_cache:
            self.cache[key] = p
        return p

    def losses(self, batch: Batch, key: Any, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
        with steer(self.model, self.params):
            if self.start is None:
                hidden = full_hidden(self.model, batch.input_ids, batch.attention_mask)
            else:
                hidden = prefix_hidden(self.model, self.prefix(batch, key))
            return token_losses(self.model, hidden, batch, objective)

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        with steer(self.model, {k: v.detach() for k, v in self.params.items()}):
            yield self.model

    def release_cache(self) -> None:
        self.cache.clear()


def init_vectors(model: nn.Module, names: list[str], cfg: FitConfig) -> dict[str, torch.Tensor]:
    """Zero or seeded-random (std cfg.init_scale) vectors, one per hook, requires_grad.

    Kept in float32 whatever the model's dtype (steer casts them at the hook).
    """
    g = torch.Generator().manual_seed(cfg.seed)
    dtype = torch.float32
    device = next(model.parameters()).device
    out = {}
    for name in names:
        dim = get_hook_point(model, name).dim
        if cfg.init == "zero":
            v = torch.zeros(dim)
        else:
            v = cfg.init_scale * torch.randn(dim, generator=g)
        out[name] = v.to(device=device, dtype=dtype).requires_grad_(True)
    return out


# ============================================================================ eval


@torch.no_grad()
def eval_losses(
    module: nn.Module,
    examples: Sequence[Example],
    batch_size: int = 16,
    pad_id: int = 0,
    teacher: bool = False,
    loss_fn: Callable[[Batch, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Mean per-token CE (and top-k KL if present) of `module` on the completions.

    Also returns "rows": per example [CE sum, KL sum, n tokens], in example order (the
    input of `gap_interval`). Data parallel: each rank takes every world_size-th batch and
    fills its rows; an all-reduce then gives every rank all rows.
    """
    rank, world = rank_world()
    rows = torch.zeros(len(examples), 3, dtype=torch.float64)  # ce, kl, n per example
    for start in range(0, len(examples), batch_size):
        if (start // batch_size) % world != rank:
            continue
        chunk = examples[start : start + batch_size]
        batch = collate(chunk, pad_id, teacher=teacher)
        if module is not None:
            batch = batch.to(_device(module))
        if loss_fn is not None:
            ce, kl = loss_fn(batch, start // batch_size)
        else:
            ctx = (
                module.steered(batch)
                if isinstance(module, _PositionalSteer)
                else contextlib.nullcontext()
            )
            inner = module.inner if isinstance(module, _PositionalSteer) else module
            with ctx:
                ce, kl = token_losses(
                    _lm(inner),
                    full_hidden(inner, batch.input_ids, batch.attention_mask),
                    batch,
                    "sft",
                )
        n = batch.loss_mask.sum(1)
        rows[start : start + len(chunk)] = torch.stack([ce.cpu(), kl.cpu(), n.cpu()], 1).double()
    if world > 1:
        dist.all_reduce(rows)  # each row is filled on exactly one rank, zeros elsewhere
    sums = rows.sum(0)
    n = max(float(sums[2]), 1.0)
    out: dict[str, Any] = {"ce": float(sums[0]) / n, "n_tokens": int(sums[2]), "rows": rows}
    if all(ex.topk_ids is not None for ex in examples):
        out["kl"] = float(sums[1]) / n
    return out


def gap_interval(
    base: dict,
    fitted: dict,
    teacher: dict | None = None,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Bootstrap interval over validation rows of the fraction of the gap closed.

    base / fitted / teacher: `eval_losses` results on the same examples. With a teacher:
    CE gap closed = (base - fitted) / (base - teacher); without: KL gap closed
    = 1 - KL_fitted / KL_base (the teacher's KL to its own top-k is 0). Rows are resampled
    with replacement, jointly for the three models (the comparison is paired).
    Returns None when there is nothing to resample (no rows, or no KL without a teacher).
    """
    b, f = base["rows"], fitted["rows"]
    if len(b) == 0 or (teacher is None and "kl" not in fitted):
        return None
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(b), (n_boot, len(b)), generator=g)  # [n_boot, rows]
    if teacher is not None:
        t = teacher["rows"]
        bs, fs, ts = (x[:, 0][idx].sum(1) for x in (b, f, t))
        ok = (bs - ts).abs() > 1e-12
        stats = ((bs - fs) / (bs - ts))[ok]
    else:
        bs, fs = (x[:, 1][idx].sum(1) for x in (b, f))
        stats = (1.0 - fs / bs)[bs > 0]
    if len(stats) == 0:
        return None
    alpha = (1.0 - level) / 2
    lo, hi = torch.quantile(stats, torch.tensor([alpha, 1.0 - alpha], dtype=stats.dtype))
    return float(lo), float(hi)


def gap_figures(
    base: dict, fitted: dict, teacher: dict | None, intervals: bool = False
) -> dict[str, Any]:
    """Gap-closed figures of `fitted` against base and teacher (`eval_losses` results on the
    same rows): CE gap closed and, with top-k data, KL gap closed (the teacher's KL to its
    own top-k is 0, so it is 1 - KL_fitted / KL_base). intervals: add the bootstrap
    intervals of `gap_interval` (gap_closed_ci is None without a teacher).
    """
    out: dict[str, Any] = {
        "gap_closed": gap_closed(base["ce"], fitted["ce"], teacher["ce"] if teacher else None)
    }
    if intervals:
        out["gap_closed_ci"] = gap_interval(base, fitted, teacher) if teacher else None
    if "kl" in fitted and base.get("kl"):
        out["val_kl"], out["base_val_kl"] = fitted["kl"], base["kl"]
        out["kl_gap_closed"] = 1.0 - fitted["kl"] / base["kl"]
        if intervals:
            out["kl_gap_closed_ci"] = gap_interval(base, fitted)
    return out


def _lm(module: nn.Module) -> nn.Module:
    """The module that owns lm_head / config (a PeftModel wraps it)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


# ============================================================================ the loop


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def maybe_init_distributed() -> tuple[int, int]:
    """Join the process group when launched by accelerate/torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    return rank_world()


def split_examples(examples: list[Example], cfg: FitConfig) -> tuple[list[Example], list[Example]]:
    """Seeded train / validation split."""
    n = len(examples)
    n_val = cfg.val_size if cfg.val_size is not None else int(round(cfg.val_fraction * n))
    n_val = min(n_val, n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    val = [examples[i] for i in perm[:n_val]]
    train = [examples[i] for i in perm[n_val:]]
    return train, val


def _ckpt_bytes(obj: dict) -> bytes:
    buf = _io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write_metrics_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def train_student(
    student: Student,
    train: list[Example],
    val: list[Example],
    cfg: FitConfig,
    *,
    pad_id: int,
    base_val: dict | None,
    teacher_val: dict | None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    prov: dict | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    save_params: Callable[[Path, dict[str, torch.Tensor], dict], None] | None = None,
) -> FitResult:
    """The optimisation loop shared by vector fits and the LoRA / full baselines."""
    rank, world = rank_world()
    out = Path(out_dir) if out_dir is not None else None
    params = student.params
    names = list(params)
    device = next(iter(params.values())).device
    opt = make_optimizer(list(params.values()), cfg)
    micro = cfg.micro_batch_size or cfg.batch_size
    if cfg.batch_size % micro:
        raise FitError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size {micro}")

    # fixed global batches (fixed so the prefix cache can be reused across epochs)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + 1))
    rows = [train[i] for i in order.tolist()]
    steps_batches = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    steps_per_epoch = len(steps_batches)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    eval_every = cfg.eval_every or steps_per_epoch

    state: dict[str, Any] = {"step": 0, "best": math.inf, "bad_evals": 0, "best_params": None}
    metrics: list[dict] = []
    ckpt_path = out / "checkpoint.pt" if out else None
    if resume and ckpt_path and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        with torch.no_grad():
            for k in names:
                params[k].copy_(ck["params"][k])
        opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
        base_val, teacher_val = ck["base_val"], ck["teacher_val"]
        metrics = [m for m in ck["metrics"]]
        if rank == 0 and out:
            _rewrite_metrics(out, metrics)
    elif rank == 0 and out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)

    def set_lr(step: int) -> float:
        lr = cfg.lr * lr_factor(step, total, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        return lr

    last_eval: dict[str, Any] = {}  # the latest evaluation, with the step it was made at

    def evaluate() -> dict[str, Any]:
        ev = eval_losses(
            student.model if hasattr(student, "model") else None,  # type: ignore[arg-type]
            val,
            micro,
            pad_id,
            loss_fn=lambda b, bi: _no_grad_losses(student, b, ("val", bi)),
        )
        last_eval.update(ev=ev, step=state["step"])
        return ev

    def save_checkpoint(step: int) -> None:
        if rank != 0 or not ckpt_path:
            return
        ck = {
            "params": {k: v.detach().cpu() for k, v in params.items()},
            "optimizer": opt.state_dict(),
            "state": state,
            "base_val": base_val,
            "teacher_val": teacher_val,
            "metrics": metrics,
            "config": cfg.model_dump(),
        }
        atomic_write_bytes(ckpt_path, _ckpt_bytes(ck))

    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=state["step"], desc="fit", leave=False)
    stopped = "done"
    t_start, tokens_seen = time.perf_counter(), 0
    base_ce = base_val["ce"] if base_val else None
    teacher_ce = teacher_val["ce"] if teacher_val else None
    try:
        while state["step"] < total:
            step = state["step"]
            epoch, idx = divmod(step, steps_per_epoch)
            perm = torch.randperm(
                steps_per_epoch, generator=torch.Generator().manual_seed(cfg.seed + 1000 + epoch)
            ).tolist()
            bidx = perm[idx]
            rows_ = steps_batches[bidx]
            n_global = sum(len(ex.completion_ids) for ex in rows_)
            lr = set_lr(step)
            opt.zero_grad(set_to_none=True)
            sums = torch.zeros(2, dtype=torch.float64)  # ce, kl (sums over the global batch)
            n_tok = 0
            micro_batches = [rows_[i : i + micro] for i in range(0, len(rows_), micro)]
            for mi, chunk in enumerate(micro_batches):
                if mi % world != rank:
                    continue
                batch = collate(chunk, pad_id).to(device)
                ce, kl = (x.sum() for x in student.losses(batch, (bidx, mi), cfg.objective))
                loss = (ce if cfg.objective == "sft" else kl) / n_global
                loss.backward()
                sums += torch.tensor([float(ce.detach()), float(kl.detach())], dtype=torch.float64)
                n_tok += int(batch.attention_mask.sum())
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
            if world > 1:
                for g in grads:
                    dist.all_reduce(g)
                dist.all_reduce(sums)
                tt = torch.tensor([n_tok])
                dist.all_reduce(tt)
                n_tok = int(tt)
            for p, g in zip(params.values(), grads, strict=True):
                p.grad = g
            train_ce, train_kl = float(sums[0]) / n_global, float(sums[1]) / n_global
            train_loss = train_ce if cfg.objective == "sft" else train_kl
            grad_norm = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads)))
            if not math.isfinite(train_loss) or not math.isfinite(grad_norm):
                last = ckpt_path if ckpt_path and ckpt_path.exists() else None
                raise FitError(
                    f"Non-finite loss at step {step + 1} (loss={train_loss}, grad_norm={grad_norm}); "
                    f"stopped without taking the step ({step} good steps before it). "
                    + (
                        f"The last good checkpoint is kept at {last} (resume from it with a "
                        "lower lr, --resume)."
                        if last
                        else "No checkpoint was written yet."
                    )
                    + " Common causes: lr too high, NaN in the data's top-k log-probs."
                )
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
            opt.step()
            if cfg.max_norm is not None:
                with torch.no_grad():
                    for v in params.values():
                        v.mul_(torch.clamp(cfg.max_norm / v.norm().clamp_min(1e-12), max=1.0))
            state["step"] = step + 1
            tokens_seen += n_tok
            row: dict[str, Any] = {
                "step": step + 1,
                "epoch": epoch,
                "lr": lr,
                "train_loss": train_loss,
                "train_ce": train_ce,
                "train_kl": train_kl if cfg.objective == "distill" else None,
                "grad_norm": grad_norm,
                "tokens": n_tok,
                "tokens_per_s": tokens_seen / max(time.perf_counter() - t_start, 1e-9),
                "base_val_loss": base_ce,
                "teacher_val_loss": teacher_ce,
            }
            if len(params) <= 512:
                row["mean_vector_norm"] = float(
                    sum(float(v.detach().norm()) for v in params.values()) / len(params)
                )
            last_step = state["step"] == total
            if val and (state["step"] % eval_every == 0 or last_step):
                ev = evaluate()
                row["val_loss"] = ev["ce"]
                if "kl" in ev:
                    row["val_kl"] = ev["kl"]
                row["gap_closed"] = None
                if base_val:
                    row.update(gap_figures(base_val, ev, teacher_val))
                crit = ev["ce"] if cfg.objective == "sft" else ev.get("kl", ev["ce"])
                if crit < state["best"] - 1e-6:
                    state["best"], state["bad_evals"] = crit, 0
                    if cfg.early_stopping_patience is not None:
                        state["best_params"] = {k: v.detach().clone() for k, v in params.items()}
                else:
                    state["bad_evals"] += 1
            metrics.append(row)
            if rank == 0 and out:
                from ..io import append_jsonl

                append_jsonl(out / "metrics.jsonl", [row])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{train_loss:.4f}",
                    **({"val": f"{row['val_loss']:.4f}"} if "val_loss" in row else {}),
                )
            if on_step is not None:
                on_step(state["step"], row)
            if (
                cfg.early_stopping_patience is not None
                and state["bad_evals"] > cfg.early_stopping_patience
            ):
                stopped = "early_stopping"
                break
            if state["step"] % cfg.checkpoint_every == 0 or last_step:
                save_checkpoint(state["step"])
        else:
            stopped = (
                "max_steps" if cfg.max_steps is not None and total == cfg.max_steps else "done"
            )
    finally:
        if bar is not None:
            bar.close()
        student.release_cache()

    if stopped == "early_stopping" and state["best_params"] is not None:
        with torch.no_grad():
            for k, v in state["best_params"].items():
                params[k].copy_(v)
    final = None  # evaluation of the parameters the fit returns
    if val:
        same = last_eval.get("step") == state["step"] and stopped != "early_stopping"
        final = last_eval["ev"] if same else evaluate()
    fitted = final["ce"] if final else None
    extra: dict[str, Any] = {}
    if final and base_val:
        extra = gap_figures(base_val, final, teacher_val, intervals=True)
        extra.pop("gap_closed")  # a FitResult field of its own
    res = FitResult(
        extra=extra,
        vectors=None,
        metrics=metrics,
        base_val_loss=base_ce,
        teacher_val_loss=teacher_ce,
        fitted_val_loss=fitted,
        gap_closed=gap_closed(base_ce, fitted, teacher_ce),
        steps=state["step"],
        stopped=stopped,
        out_dir=out,
    )
    if rank == 0 and out:
        _write_metrics_csv(out / "metrics.csv", metrics)
        if save_params is not None:
            save_params(out, params, res.summary())
        atomic_write_json(out / "result.json", {**res.summary(), "provenance": prov or {}})
    return res


def _rewrite_metrics(out: Path, metrics: list[dict]) -> None:
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))


@torch.no_grad()
def _no_grad_losses(student: Student, batch: Batch, key: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return student.losses(batch, key, "distill" if batch.topk_ids is not None else "sft")


# ============================================================================ fit


def prepare_examples(
    lm: LoadedModel | nn.Module,
    data: str | os.PathLike | Sequence[dict] | Sequence[Example],
    teacher: dict | None = None,
    max_len: int | None = None,
) -> tuple[list[Example], dict]:
    """Path / rows / Examples -> (Examples, teacher spec)."""
    manifest: dict = {}
    if isinstance(data, (str, os.PathLike)):
        rows, manifest = load_dataset(data)
        data = rows
    data = list(data)
    if not data:
        raise FitError("The dataset is empty: nothing to fit.")
    teacher = teacher if teacher is not None else manifest.get("teacher")
    if isinstance(data[0], Example):
        examples = list(data)  # type: ignore[arg-type]
    else:
        tok = lm.tokenizer if isinstance(lm, LoadedModel) else None
        if tok is None:
            raise FitError("Rows of messages need a tokenizer: pass a LoadedModel (load_model()).")
        examples = tokenize_rows(tok, data, teacher)  # type: ignore[arg-type]
    for i, ex in enumerate(examples):
        if not ex.completion_ids:
            raise FitError(f"Row {i} (id={ex.id}) has an empty completion: nothing to train on.")
        if not ex.prompt_ids:
            raise FitError(f"Row {i} (id={ex.id}) has an empty prompt.")
    if max_len is not None:
        examples = [ex for ex in examples if len(ex) <= max_len]
        if not examples:
            raise FitError(f"No row is at most max_len={max_len} tokens long.")
    return examples, teacher or {}


def model_provenance(lm: LoadedModel | nn.Module, cfg: FitConfig) -> dict:
    """provenance() plus model id / weights hash also for a bare (in-memory) module."""
    prov = provenance(lm, cfg, cfg.seed)
    if not isinstance(lm, LoadedModel):
        from ..models import weights_hash_of_model

        prov.update(
            model_id="in-memory",
            model_type=lm.config.model_type,
            weights_hash=weights_hash_of_model(lm),
        )
    return prov


def _pad_id(lm: LoadedModel | nn.Module) -> int:
    tok = lm.tokenizer if isinstance(lm, LoadedModel) else None
    if tok is not None and tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    return 0


def reference_losses(
    lm: LoadedModel | nn.Module, val: list[Example], teacher: dict, batch_size: int
) -> tuple[dict, dict | None]:
    """Validation losses of the base model and of the teacher on the same completions."""
    model, pad = unwrap(lm), _pad_id(lm)
    base_val = eval_losses(model, val, batch_size, pad)
    teacher_val = None
    kind = teacher.get("kind", "plain")
    if kind != "plain" and (kind != "prompt" or any(ex.teacher_prompt_ids for ex in val)):
        with teacher_context(lm, teacher) as tm:
            teacher_val = eval_losses(tm, val, batch_size, pad, teacher=True)
    return base_val, teacher_val


def evaluate_vectors(
    lm: LoadedModel | nn.Module,
    data: str | os.PathLike | Sequence[dict] | Sequence[Example],
    vectors: VectorSet | dict[str, torch.Tensor],
    config: FitConfig | None = None,
    *,
    teacher: dict | None = None,
) -> dict[str, Any]:
    """Validation losses of base / teacher / base + `vectors` on the rows a fit with
    `config` holds out (same seed, same split), the gap closed and its bootstrap intervals.

    For vectors fitted earlier (or by someone else): the figures `fit` reports at its end.
    """
    cfg = config or FitConfig()
    examples, teacher = prepare_examples(lm, data, teacher, cfg.max_len)
    _, val = split_examples(examples, cfg)
    if not val:
        raise FitError("No validation rows: set val_size or val_fraction above 0.")
    micro = cfg.micro_batch_size or cfg.batch_size
    base_val, teacher_val = reference_losses(lm, val, teacher, micro)
    model = unwrap(lm)
    if isinstance(vectors, VectorSet):
        vectors.check_fits(model)  # a VectorSetError names the hook or shape that differs
    with steer(model, vectors):
        ev = eval_losses(model, val, micro, _pad_id(lm))
    return {
        "n_val_rows": len(val),
        "n_val_tokens": ev["n_tokens"],
        "base_val_loss": base_val["ce"],
        "teacher_val_loss": teacher_val["ce"] if teacher_val else None,
        "fitted_val_loss": ev["ce"],
        **gap_figures(base_val, ev, teacher_val, intervals=True),
    }


def fit(
    lm: LoadedModel | nn.Module,
    data: str | os.PathLike | Sequence[dict] | Sequence[Example],
    config: FitConfig | None = None,
    *,
    teacher: dict | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
    **overrides: Any,
) -> FitResult:
    """Fit trainable vectors at `config.hooks` (all model weights frozen) to a dataset.

    data: a dataset JSONL path (its manifest gives the teacher), rows in the dataset
    format, or Examples. teacher: overrides the manifest's teacher spec (used for the
    teacher's validation loss and the gap closed). out_dir: checkpoints, metrics.jsonl /
    .csv, vectors.safetensors, result.json. resume: continue from out_dir's checkpoint.
    """
    cfg = (config or FitConfig()).model_copy(update=overrides)
    FitConfig.model_validate(cfg.model_dump())
    rank, _ = maybe_init_distributed()
    model = unwrap(lm)
    family_of(model)
    try:
        names = select_hooks(model, cfg.hooks)
    except HookError as e:
        raise FitError(f"Hook selection {cfg.hooks} matches no hook point: {e}") from e
    examples, teacher = prepare_examples(lm, data, teacher, cfg.max_len)
    train, val = split_examples(examples, cfg)
    micro = cfg.micro_batch_size or cfg.batch_size
    base_val, teacher_val = (None, None)
    if val:
        base_val, teacher_val = reference_losses(lm, val, teacher, micro)
    model.requires_grad_(False)
    params = init_vectors(model, names, cfg)
    student = VectorStudent(model, params, cfg)
    prov = model_provenance(lm, cfg)
    prov["teacher"] = teacher
    prov["hooks"] = names

    def save(out: Path, p: dict[str, torch.Tensor], summary: dict) -> None:
        _vector_set(lm, p, cfg, summary, teacher).save(out / "vectors.safetensors")

    if rank == 0 and out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out_dir) / "config.json", {"config": cfg.model_dump(), **prov})
    res = train_student(
        student,
        train,
        val,
        cfg,
        pad_id=_pad_id(lm),
        base_val=base_val,
        teacher_val=teacher_val,
        out_dir=out_dir,
        resume=resume,
        prov=prov,
        on_step=on_step,
        save_params=save,
    )
    res.vectors = _vector_set(lm, params, cfg, res.summary(), teacher)
    return res


def _vector_set(
    lm: LoadedModel | nn.Module,
    p: dict[str, torch.Tensor],
    cfg: FitConfig,
    summary: dict,
    teacher: dict,
) -> VectorSet:
    return VectorSet.for_model(
        lm,
        {k: v.detach().cpu().clone() for k, v in p.items()},
        method=f"fit:{cfg.objective}",
        positions="all",
        fit_config=cfg.model_dump(),
        fit_summary=summary,
        teacher=teacher,
    )


# ============================================================================ utilities


@torch.no_grad()
def annotate_topk(
    lm: LoadedModel | nn.Module,
    examples: list[Example],
    teacher: dict | None,
    k: int = 20,
    batch_size: int = 16,
) -> list[Example]:
    """Fill topk_ids / topk_logprobs from a teacher forward (for data made without them)."""
    model, pad = unwrap(lm), _pad_id(lm)
    with teacher_context(lm, teacher) as tm:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            batch = collate(chunk, pad, teacher=True).to(_device(model))
            ctx = (
                tm.steered(batch) if isinstance(tm, _PositionalSteer) else contextlib.nullcontext()
            )
            inner = tm.inner if isinstance(tm, _PositionalSteer) else tm
            with ctx:
                h = full_hidden(inner, batch.input_ids, batch.attention_mask)[
                    batch.loss_mask
                ]  # [n, d]
            logp = torch.log_softmax(lm_head(_lm(inner), h).float(), dim=-1)  # [n, vocab]
            top = logp.topk(min(k, logp.shape[-1]), dim=-1)
            j = 0
            for ex in chunk:
                n = len(ex.completion_ids)
                ex.topk_ids = top.indices[j : j + n].tolist()
                ex.topk_logprobs = top.values[j : j + n].tolist()
                j += n
    del model
    return examples
