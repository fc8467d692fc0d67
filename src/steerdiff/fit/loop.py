"""The optimisation loop shared by vector fits and the LoRA / full-finetune baselines.

Each optimizer step takes one fixed global batch (batch_size rows, split into
micro-batches over ranks, see fit.distributed), evaluates every `eval_every` steps,
checkpoints every `checkpoint_every` steps, and can stop early or resume.

When it stops: after `epochs` passes at most (or `max_steps`), earlier when the validation
loss has converged (`converge_tol`: the last `converge_patience` evaluations improved its
best by less than that fraction; recorded as stopped "converged") or, with
`early_stopping_patience`, when it got worse (the best parameters are kept).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..budget import freed_memory_returns, memory_budget_bytes
from ..io import append_jsonl, atomic_write_json, atomic_write_text
from ..progress import progress
from .checkpoint import (
    LoopState,
    kept_message,
    load_checkpoint,
    run_identity,
    save_checkpoint,
)
from .config import FitConfig, FitError, FitResult
from .data import Batch, Example, collate, resolve_objective
from .distributed import all_reduce_, rank_world
from .losses import eval_losses, gap_closed, gap_figures, result_figures
from .memory import CacheUse, pack_topk
from .online import OnlineTeacher, online_eval
from .optim import lr_factor, make_optimizer, set_lr
from .students import Student

# rows at the fit's start on which each hook's activation scale is measured (lr_units)
SCALE_ROWS = 8


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
    extra: dict[str, Any] | None = None,
    teacher: OnlineTeacher | None = None,
    teacher_vectors: dict[str, torch.Tensor] | None = None,
) -> FitResult:
    """Train `student.params` on `train`, evaluating on `val`; files go to out_dir.

    base_val / teacher_val: `eval_losses` of the base model and the teacher on `val`
    (for the gap closed). save_params(out_dir, params, summary) writes what was trained.
    extra: more for the summary and result.json (e.g. the resolved objective, notes).
    teacher: the teacher objective "online" distils from (fit.online). teacher_vectors:
    the teacher's own vectors where known (a steered teacher: coeff x its vectors): each
    metrics row then has the mean cosine of the trained vectors with them, and the result
    `vector_vs_teacher` {hook: cosine, fitted_norm, teacher_norm}.
    resume: continue from out_dir's checkpoint; FitError listing the settings that differ
    from the checkpoint's. A non-finite loss, gradient or parameter stops the fit with a
    FitError before anything non-finite is saved: the checkpoint on disk stays the last
    good one.
    """
    rank, _ = rank_world()
    if cfg.objective == "auto":
        cfg = cfg.model_copy(update={"objective": resolve_objective(cfg, train + val, False)[0]})
    if cfg.objective == "online" and teacher is None:
        raise FitError(
            "objective 'online' needs a teacher to run during the fit: pass teacher=... "
            "(a steered, prompt or adapter teacher on the student's model)."
        )
    out = Path(out_dir) if out_dir is not None else None
    params = student.params
    if cfg.batch_size % cfg.micro:
        raise FitError(
            f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size {cfg.micro}"
        )

    batches = fixed_batches(train, cfg)
    scales = None
    if cfg.lr_units == "activation":
        first = [ex for rows in batches for ex in rows][:SCALE_ROWS]
        scales = student.activation_scales(first, pad_id)
    opt = make_optimizer(params if scales is not None else list(params.values()), cfg, scales)
    extra = {**(extra or {}), **lr_units_figures(cfg, scales)}
    total = len(batches) * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    eval_every = cfg.eval_every or len(batches)
    say = cfg.progress and rank == 0
    packed = pack_topk(train + val, memory_budget_bytes(cfg.cache_budget))
    if packed and say:
        print(packed, file=sys.stderr, flush=True)
    student.plan_memory(cache_use(batches, val, cfg, total, eval_every), cfg, say=say)

    state, metrics = LoopState(), []
    ckpt_path = out / "checkpoint.pt" if out else None
    identity = run_identity(cfg, prov, train, val)
    if resume and ckpt_path and ckpt_path.exists():
        state, metrics, base_val, teacher_val = load_checkpoint(ckpt_path, params, opt, identity)
        if rank == 0 and out:
            atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    elif rank == 0 and out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    base_ce = base_val["ce"] if base_val else None
    teacher_ce = teacher_val["ce"] if teacher_val else None

    last_eval: tuple[int, dict] | None = None  # (step, eval_losses result) of the latest eval

    def evaluate() -> dict[str, Any]:
        nonlocal last_eval
        module = getattr(student, "model", None)
        if cfg.objective == "online" and teacher is not None:
            ev = online_eval(
                module,  # type: ignore[arg-type]
                val,
                teacher,
                lambda b, bi, t: _no_grad_losses(student, b, ("val", bi), t),
                cfg.micro,
                pad_id,
            )
        else:
            ev = eval_losses(
                module,  # type: ignore[arg-type]
                val,
                cfg.micro,
                pad_id,
                loss_fn=lambda b, bi: _no_grad_losses(student, b, ("val", bi)),
            )
        last_eval = (state.step, ev)
        return ev

    crit_key = "ce" if cfg.objective == "sft" else "kl"
    shared = sorted(set(teacher_vectors or {}) & set(params))

    bar = progress(total, "fit", initial=state.step, disable=not cfg.progress or rank != 0)
    t_start, tokens_seen = time.perf_counter(), 0
    with freed_memory_returns():  # a step's freed activations go back to the OS
        try:
            while state.step < total and state.stopped is None:
                step = state.step
                epoch, b = batch_of_step(step, len(batches), cfg.seed)
                lr = set_lr(opt, cfg.lr * lr_factor(step, total, cfg))
                opt.zero_grad(set_to_none=True)
                penalty = backward_penalty(student, rank)  # its gradient joins the data's
                train_ce, train_kl, n_tok, grad_norm = accumulate_gradients(
                    student, batches[b], b, cfg, pad_id, teacher
                )
                train_loss = train_ce if cfg.objective == "sft" else train_kl
                if not math.isfinite(train_loss) or not math.isfinite(grad_norm):
                    raise _non_finite(step, train_loss, grad_norm, ckpt_path)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
                opt.step()
                if cfg.max_norm is not None:
                    with torch.no_grad():
                        for v in params.values():
                            v.mul_(torch.clamp(cfg.max_norm / v.norm().clamp_min(1e-12), max=1.0))
                student.constrain()  # e.g. the whitened cap (fit.whitened)
                state.step = step + 1
                tokens_seen += n_tok

                row: dict[str, Any] = {
                    "step": state.step,
                    "epoch": epoch,
                    "lr": lr,
                    "train_loss": train_loss,
                    "train_ce": train_ce,
                    "train_kl": train_kl if cfg.objective in ("distill", "online") else None,
                    "grad_norm": grad_norm,
                    "tokens": n_tok,
                    "tokens_per_s": tokens_seen / max(time.perf_counter() - t_start, 1e-9),
                    "base_val_loss": base_ce,
                    "teacher_val_loss": teacher_ce,
                }
                if penalty is not None:
                    row["penalty"] = penalty
                if len(params) <= 512:
                    norms = [float(v.detach().norm()) for v in params.values()]
                    row["mean_vector_norm"] = float(sum(norms) / len(params))
                if shared:
                    row["teacher_cosine"] = mean_cosine(params, teacher_vectors or {}, shared)
                last_step = state.step == total
                if val and (state.step % eval_every == 0 or last_step):
                    ev = evaluate()
                    row.update(val_row(ev, base_val, teacher_val))
                    crit = ev.get(crit_key, ev["ce"])
                    state.record_eval(
                        crit, params, keep_best=cfg.early_stopping_patience is not None
                    )
                    if not last_step and state.converged(cfg.converge_tol, cfg.converge_patience):
                        state.stopped = "converged"
                if on_step is not None:  # before the row is written: it may add columns
                    on_step(state.step, row)
                metrics.append(row)
                if rank == 0 and out:
                    append_jsonl(out / "metrics.jsonl", [row])
                bar.update(1)
                val_loss = {"val": f"{row['val_loss']:.4f}"} if "val_loss" in row else {}
                bar.set_postfix(loss=f"{train_loss:.4f}", **val_loss)
                patience = cfg.early_stopping_patience
                if patience is not None and state.bad_evals > patience:
                    state.stopped = "early_stopping"
                if (
                    rank == 0
                    and ckpt_path
                    and (state.step % cfg.checkpoint_every == 0 or last_step or state.stopped)
                ):
                    check_finite(params, state.step, ckpt_path)
                    save_checkpoint(
                        ckpt_path, params, opt, state, metrics, base_val, teacher_val, identity
                    )
        finally:
            bar.close()
            student.release_cache()

    stopped = state.stopped or (
        "max_steps" if cfg.max_steps is not None and total == cfg.max_steps else "done"
    )
    # the parameters the fit returns, and their validation losses
    if stopped == "early_stopping" and state.best_params is not None:
        with torch.no_grad():
            for k, v in state.best_params.items():
                params[k].copy_(v)
    final = None
    if val:
        if last_eval is not None and last_eval[0] == state.step and stopped != "early_stopping":
            final = last_eval[1]
        else:
            final = evaluate()
    fitted = final["ce"] if final else None
    figures: dict[str, Any] = {}
    if final and base_val:
        figures = result_figures(base_val, final, teacher_val)
        figures.pop("gap_closed")  # a FitResult field of its own
    if shared:
        figures["vector_vs_teacher"] = vector_vs_teacher(params, teacher_vectors or {}, shared)
    res = FitResult(
        extra={**figures, **(extra or {})},
        vectors=None,
        metrics=metrics,
        base_val_loss=base_ce,
        teacher_val_loss=teacher_ce,
        fitted_val_loss=fitted,
        gap_closed=gap_closed(base_ce, fitted, teacher_ce),
        steps=state.step,
        stopped=stopped,
        out_dir=out,
    )
    if rank == 0 and out:
        check_finite(params, state.step, ckpt_path)
        write_metrics_csv(out / "metrics.csv", metrics)
        if save_params is not None:
            save_params(out, params, res.summary())
        atomic_write_json(out / "result.json", {**res.summary(), "provenance": prov or {}})
    return res


def fixed_batches(train: list[Example], cfg: FitConfig) -> list[list[Example]]:
    """Global batches of batch_size rows in a seeded order, fixed for the whole fit (so the
    prefix cache can be reused across epochs)."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + 1))
    rows = [train[i] for i in order.tolist()]
    return [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]


def cache_use(
    batches: list[list[Example]], val: list[Example], cfg: FitConfig, total: int, eval_every: int
) -> CacheUse:
    """This rank's micro-batch shapes and how often each is read (train: the epochs the
    steps reach; val: the evaluations, one more when early stopping may restore the best)."""
    rank, world = rank_world()

    def shapes(rows: list[Example], every: int) -> list[tuple[int, int]]:
        chunks = [rows[i : i + cfg.micro] for i in range(0, len(rows), cfg.micro)]
        return [(len(c), max(len(ex) for ex in c)) for c in chunks[rank::every]]

    train = [sh for rows in batches for sh in shapes(rows, world)]
    evals = sum(1 for s in range(1, total + 1) if s % eval_every == 0 or s == total)
    evals += cfg.early_stopping_patience is not None
    return CacheUse(train, math.ceil(total / len(batches)), shapes(val, world), evals if val else 0)


def batch_of_step(step: int, n_batches: int, seed: int) -> tuple[int, int]:
    """(epoch, which fixed batch) of optimizer step `step`: each epoch has its seeded order."""
    epoch, i = divmod(step, n_batches)
    gen = torch.Generator().manual_seed(seed + 1000 + epoch)
    return epoch, int(torch.randperm(n_batches, generator=gen)[i])


def accumulate_gradients(
    student: Student,
    rows: list[Example],
    key: int,
    cfg: FitConfig,
    pad_id: int,
    teacher: OnlineTeacher | None = None,
) -> tuple[float, float, int, float]:
    """Backward of one global batch; leaves the gradients (summed over ranks) in p.grad.

    This rank takes every world_size-th micro-batch. The loss is normalised by the
    completion tokens of the whole global batch. Returns (mean CE, mean KL per completion
    token: top-k for "distill", full-vocabulary online for "online", tokens seen,
    gradient norm before clipping). Objective "online": the teacher's target for each
    micro-batch is computed here, under no_grad (fit.online).
    """
    rank, world = rank_world()
    params = list(student.params.values())
    device = params[0].device
    n_global = sum(ex.n_loss for ex in rows)  # trained tokens (Example.loss_mask)
    sums = torch.zeros(2, dtype=torch.float64)  # ce, kl (sums over the global batch)
    n_tok = torch.zeros(1, dtype=torch.long)
    for mi in range(rank, math.ceil(len(rows) / cfg.micro), world):
        chunk = rows[mi * cfg.micro : (mi + 1) * cfg.micro]
        batch = collate(chunk, pad_id).to(device)
        args: tuple = (batch, (key, mi), cfg.objective)
        if cfg.objective == "online" and teacher is not None:  # (a Student of objectives
            args += (teacher.target(chunk, device),)  # without a teacher takes 3 arguments)
        ce, kl = (x.sum() for x in student.losses(*args))
        loss = (ce if cfg.objective == "sft" else kl) / n_global
        loss.backward()
        sums += torch.tensor([float(ce.detach()), float(kl.detach())], dtype=torch.float64)
        n_tok += int(batch.attention_mask.sum())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    all_reduce_(*grads, sums, n_tok)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    grad_norm = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads)))
    return float(sums[0]) / n_global, float(sums[1]) / n_global, int(n_tok), grad_norm


def backward_penalty(student: Student, rank: int) -> float | None:
    """Backward of `student.penalty()` (rank 0 only: gradients are summed over ranks); its value."""
    pen = student.penalty()
    if pen is not None and rank == 0:
        pen.backward()
    return None if pen is None else float(pen.detach())


def val_row(ev: dict, base_val: dict | None, teacher_val: dict | None) -> dict[str, Any]:
    """The validation columns of a metrics row."""
    row: dict[str, Any] = {"val_loss": ev["ce"]}
    if "kl" in ev:
        row["val_kl"] = ev["kl"]
    row["gap_closed"] = None
    if base_val:
        row.update(gap_figures(base_val, ev, teacher_val))
    return row


@torch.no_grad()
def _no_grad_losses(
    student: Student, batch: Batch, key: Any, target: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if target is not None:
        return student.losses(batch, key, "online", target)
    return student.losses(batch, key, "distill" if batch.topk_ids is not None else "sft")


def lr_units_figures(cfg: FitConfig, scales: dict[str, float] | None) -> dict[str, Any]:
    """What result.json records of the learning rate's units: lr_units and, in activation
    units, each trained tensor's measured scale (activation RMS per coordinate)."""
    if scales is None:
        return {"lr_units": "absolute"}
    return {"lr_units": cfg.lr_units, "lr_scale": {k: round(v, 6) for k, v in scales.items()}}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().flatten(), b.detach().float().flatten().to(a.device)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def mean_cosine(
    params: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], hooks: list[str]
) -> float:
    """Mean over `hooks` of cosine(trained vector, teacher's vector)."""
    return sum(_cos(params[h], teacher[h]) for h in hooks) / len(hooks)


def vector_vs_teacher(
    params: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], hooks: list[str]
) -> dict[str, dict[str, float]]:
    """{hook: {cosine, fitted_norm, teacher_norm}}: the fitted vectors next to the teacher's."""
    return {
        h: {
            "cosine": _cos(params[h], teacher[h]),
            "fitted_norm": float(params[h].detach().float().norm()),
            "teacher_norm": float(teacher[h].detach().float().norm()),
        }
        for h in hooks
    }


def _non_finite(step: int, loss: float, grad_norm: float, ckpt_path: Path | None) -> FitError:
    return FitError(
        f"Non-finite loss at step {step + 1} (loss={loss}, grad_norm={grad_norm}); "
        f"stopped without taking the step ({step} good steps before it). "
        + kept_message(ckpt_path)
        + " Common causes: lr too high (start again with a lower --lr, into another --out or "
        "with --overwrite), NaN in the data's top-k log-probs."
    )


def check_finite(params: dict[str, torch.Tensor], step: int, ckpt_path: Path | None) -> None:
    """FitError (before anything is saved) if a trained parameter is not finite."""
    bad = [k for k, v in params.items() if not bool(torch.isfinite(v.detach()).all())]
    if bad:
        raise FitError(
            f"Non-finite parameters after step {step} ({bad[0]}"
            + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
            + "); nothing was saved for this step. "
            + kept_message(ckpt_path)
            + " Lower --lr (or set --grad-clip / --max-norm)."
        )


# ============================================================================ files


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())
