"""Losses on completion tokens, validation losses per row, and the fraction of the gap closed.

Two objectives, both on the assistant (completion) tokens only:

    sft:     CE     = -log p_student(y_t | y_<t, prompt)
    distill: KL_t   = sum_{i in topk_t} p_T(i) (log p_T(i) - log q_S(i))
             where p_T = softmax(teacher top-k log-probs) and q_S = the student's
             probabilities renormalised over the same k token ids.

gap closed = (base - fitted) / (base - teacher): 1.0 = as good as the teacher on its data.

Data decoded under a constraint (a Batch with allowed_ids) is scored under it: every
model's log-probs are renormalised over the ids the constraint allowed at each position
(`constrain`), for CE and KL alike, since that is the distribution the teacher sampled from.
A top-k target entry with log-prob -inf (padding), or outside the allowed ids, is no candidate.

A fraction is only as good as its gap: when base and teacher differ by less than
NOISE_GAP_NATS per token (`gap_within_noise`), the CE fraction is dominated by noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..progress import progress
from ..replay import full_hidden, lm_head
from .config import FitError
from .data import Batch, Example, collate, device_of
from .distributed import rank_world


def lm_of(module: nn.Module) -> nn.Module:
    """The module that owns lm_head / config (a PeftModel wraps it)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def constrain(logp: torch.Tensor, batch: Batch) -> torch.Tensor:
    """logp [n, V] (log-probs at the batch's loss positions) renormalised over the ids the
    data's decoding constraint allowed at each position, -inf elsewhere; `logp` itself when
    the batch carries no constraint."""
    if batch.allowed_ids is None or batch.allowed_mask is None:
        return logp
    ids, mask = batch.allowed_ids.to(logp.device), batch.allowed_mask.to(logp.device)
    ids = torch.where(mask, ids, ids[:, :1])  # padding -> the position's first allowed id
    allowed = torch.zeros(logp.shape, dtype=torch.bool, device=logp.device).scatter_(1, ids, True)
    masked = logp.masked_fill(~allowed, float("-inf"))
    return masked - masked.logsumexp(-1, keepdim=True)


def topk_kl(logp: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[n] KL(p_T || q_S) per loss token over the teacher's top-k ids: p_T = softmax of the
    stored top-k log-probs, q_S = the student's `logp` renormalised over the same ids.
    Entries that are padding (-inf) or outside the allowed ids are left out of both."""
    ids = batch.topk_ids.to(logp.device)  # type: ignore[union-attr]  # [n, k]
    lp_t = batch.topk_logprobs.to(logp.device)  # type: ignore[union-attr]  # [n, k]
    keep = lp_t != float("-inf")  # (a NaN target stays: it must stop the fit, not vanish)
    if batch.allowed_ids is not None and batch.allowed_mask is not None:
        a_ids, a_mask = batch.allowed_ids.to(logp.device), batch.allowed_mask.to(logp.device)
        keep &= ((ids[:, :, None] == a_ids[:, None, :]) & a_mask[:, None, :]).any(-1)
    lost = -1e30  # finite: p_T = 0 exactly there, and 0 * finite keeps gradients finite
    log_pt = torch.log_softmax(lp_t.masked_fill(~keep, lost), dim=-1)  # [n, k]
    log_qs = torch.log_softmax(logp.gather(1, ids).masked_fill(~keep, lost), dim=-1)
    return (log_pt.exp() * (log_pt - log_qs)).sum(-1) * keep.any(-1)


def token_losses(
    model: nn.Module, hidden: torch.Tensor, batch: Batch, objective: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums over loss tokens of CE and of top-k KL (zeros without top-k data),
    under the batch's decoding constraint when it has one (`constrain`; the unconstrained
    CE is then left in batch.ce_unconstrained, detached).

    hidden: [b, s, d]. Returns two [b] tensors; training sums them over the batch,
    evaluation keeps them per row (for bootstrap intervals over validation rows).
    """
    h = hidden[batch.loss_mask]  # [n, d] (row-major, matches batch.targets)
    row = batch.loss_mask.nonzero()[:, 0].to(h.device)  # [n] which row each token is in
    full = torch.log_softmax(lm_head(model, h).float(), dim=-1)  # [n, vocab]
    targets = batch.targets[:, None].to(h.device)
    zeros = torch.zeros(hidden.shape[0], device=h.device)
    logp = constrain(full, batch)
    if logp is not full:
        batch.ce_unconstrained = zeros.index_add(0, row, -full.gather(1, targets)[:, 0]).detach()
    ce = zeros.index_add(0, row, -logp.gather(1, targets)[:, 0])
    kl = zeros
    if objective == "distill" or batch.topk_ids is not None:
        if batch.topk_ids is None:
            raise FitError(
                "objective='distill' needs top-k teacher log-probs (topk_ids, topk_logprobs) "
                "in every row; regenerate the data with top-k, or use annotate_topk()."
            )
        kl = zeros.index_add(0, row, topk_kl(logp, batch))
    return ce, kl


def model_losses(
    module: nn.Module, batch: Batch, objective: str = "sft"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_losses` of a full forward of `module` (a model, a PEFT model, a copy)."""
    hidden = full_hidden(module, batch.input_ids, batch.attention_mask)  # [b, s, d]
    return token_losses(lm_of(module), hidden, batch, objective)


# The rule the experiment report uses (and may import from here): a base-to-teacher CE gap
# under this many nats per token is dominated by noise; its gap-closed fraction swings far
# outside 0..1 (0.45 to 1.33 between epochs on a 0.014-nat gap).
NOISE_GAP_NATS = 0.05


def gap_within_noise(base: float | None, teacher: float | None) -> bool | None:
    """Is the base-to-teacher CE gap too small (< NOISE_GAP_NATS) for its fraction to mean
    much? None without both losses."""
    if base is None or teacher is None:
        return None
    return abs(base - teacher) < NOISE_GAP_NATS


def gap_closed(base: float | None, fitted: float | None, teacher: float | None) -> float | None:
    """(base - fitted) / (base - teacher): 1.0 = as good as the teacher on its own data."""
    if base is None or fitted is None or teacher is None or abs(base - teacher) < 1e-12:
        return None
    return (base - fitted) / (base - teacher)


@torch.no_grad()
def eval_losses(
    module: nn.Module,
    examples: Sequence[Example],
    batch_size: int = 16,
    pad_id: int = 0,
    teacher: bool = False,
    loss_fn: Callable[[Batch, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    desc: str | None = None,
) -> dict[str, Any]:
    """Mean per-token CE (and top-k KL if present) of `module` on the completions.

    desc: show progress under this name (rows scored; plain lines in a log file).

    loss_fn(batch, batch index) -> per-row (CE, KL) replaces a plain forward of `module`
    (a student's cached forward, a teacher's steered one). Also returns "rows": per
    example [CE sum, KL sum, n tokens], in example order (the input of `gap_interval`).
    Data parallel: each rank takes every world_size-th batch and fills its rows; an
    all-reduce then gives every rank all rows.
    """
    rank, world = rank_world()
    rows = torch.zeros(len(examples), 3, dtype=torch.float64)  # ce, kl, n per example
    unc = torch.zeros(len(examples), dtype=torch.float64)  # CE under the full distribution
    bar = progress(len(examples), desc or "", disable=desc is None or rank != 0)
    for start in range(0, len(examples), batch_size):
        bar.update(min(batch_size, len(examples) - start))
        if (start // batch_size) % world != rank:
            continue
        chunk = examples[start : start + batch_size]
        batch = collate(chunk, pad_id, teacher=teacher)
        if module is not None:
            batch = batch.to(device_of(module))
        if loss_fn is not None:
            ce, kl = loss_fn(batch, start // batch_size)
        else:
            ce, kl = model_losses(module, batch)
        n = batch.loss_mask.sum(1)
        rows[start : start + len(chunk)] = torch.stack([ce.cpu(), kl.cpu(), n.cpu()], 1).double()
        if batch.ce_unconstrained is not None:
            unc[start : start + len(chunk)] = batch.ce_unconstrained.cpu().double()
    bar.close()
    if world > 1:
        dist.all_reduce(rows)  # each row is filled on exactly one rank, zeros elsewhere
        dist.all_reduce(unc)
    sums = rows.sum(0)
    n = max(float(sums[2]), 1.0)
    out: dict[str, Any] = {"ce": float(sums[0]) / n, "n_tokens": int(sums[2]), "rows": rows}
    out["constrained"] = bool(examples) and all(ex.allowed is not None for ex in examples)
    if out["constrained"]:
        out["ce_unconstrained"] = float(unc.sum()) / n
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


def result_figures(base: dict, fitted: dict, teacher: dict | None) -> dict[str, Any]:
    """What result.json reports of a fit's validation: `gap_figures` with intervals, the
    rows and tokens behind them, both gaps in nats per token (CE: base - teacher, KL: the
    base's KL to the teacher's top-k) and whether the CE gap is within noise."""
    out = gap_figures(base, fitted, teacher, intervals=True)
    out["n_val_rows"] = len(fitted["rows"])
    out["n_val_tokens"] = fitted["n_tokens"]
    out["ce_gap"] = base["ce"] - teacher["ce"] if teacher else None
    out["ce_gap_within_noise"] = gap_within_noise(base["ce"], teacher["ce"] if teacher else None)
    out["kl_gap"] = base.get("kl") if "kl" in fitted else None
    out["scored_under_constraint"] = bool(fitted.get("constrained"))
    if fitted.get("constrained"):  # the same rows' CE under the full distribution too
        for name, ev in (("base", base), ("teacher", teacher), ("fitted", fitted)):
            if ev is not None and "ce_unconstrained" in ev:
                out[f"{name}_val_loss_unconstrained"] = ev["ce_unconstrained"]
    return out
