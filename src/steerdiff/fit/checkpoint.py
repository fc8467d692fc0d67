"""A fit's checkpoint: what it holds, and what a fit that resumes from it must share.

checkpoint.pt (written atomically every `checkpoint_every` steps) holds the trained
parameters, the optimizer state, the loop state, the metrics so far, the reference
losses, and the run's identity (`run_identity`: every setting that changes what is
trained, the model and the data). Resuming with another identity is a FitError that
lists each difference as `field: old -> new`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_bytes
from .config import FitConfig, FitError
from .data import Example


@dataclass
class LoopState:
    """What a checkpoint restores besides the parameters, the optimizer and the metrics."""

    step: int = 0  # optimizer steps taken
    best: float = math.inf  # best validation criterion so far
    bad_evals: int = 0  # evaluations since the best one
    best_params: dict[str, torch.Tensor] | None = None  # kept for early stopping
    evals: list[float] = field(default_factory=list)  # validation criterion per evaluation
    stopped: str | None = None  # why the fit stopped before its last step (a resume ends)

    def record_eval(self, crit: float, params: dict[str, torch.Tensor], keep_best: bool) -> None:
        """Track the best validation criterion (and with keep_best, its parameters)."""
        self.evals.append(crit)
        if crit < self.best - 1e-6:
            self.best, self.bad_evals = crit, 0
            if keep_best:
                self.best_params = {k: v.detach().clone() for k, v in params.items()}
        else:
            self.bad_evals += 1

    def converged(self, tol: float | None, patience: int) -> bool:
        """Did the last `patience` evaluations improve the best validation criterion by
        less than the fraction `tol` of the best before them? Needs patience + 1
        evaluations. (Relative: a loss falling geometrically, as a KL to a teacher the
        student can match does, keeps going; a plateau stops.)"""
        if not tol or len(self.evals) <= patience:  # None or 0: no convergence stop
            return False
        before, recent = min(self.evals[:-patience]), min(self.evals[-patience:])
        return before - recent < tol * abs(before)


# settings a resumed fit may change: they do not change what is trained
RESUME_MAY_CHANGE = ("progress", "checkpoint_every", "cache_budget")


def run_identity(
    cfg: FitConfig, prov: dict | None, train: list[Example], val: list[Example]
) -> dict[str, Any]:
    """What a checkpoint must share with the fit that resumes it: every FitConfig field
    (but RESUME_MAY_CHANGE), the model (and its dtype: a float32 fit does not go on in
    bfloat16), hooks / LoRA settings, and the data's token ids."""
    prov = prov or {}
    ident: dict[str, Any] = {
        k: v for k, v in cfg.model_dump(mode="json").items() if k not in RESUME_MAY_CHANGE
    }
    keys = ("model_id", "weights_hash", "dtype", "hooks", "lora", "baseline", "sae_sha256")
    for key in (*keys, "whiten_sha256"):
        if key in prov:
            ident[key] = json.loads(json.dumps(prov[key], default=str))
    ident["data"] = f"{len(train)} training / {len(val)} validation rows, " + _fingerprint(
        train + val
    )
    return ident


def _fingerprint(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        for ids in (ex.prompt_ids, ex.teacher_prompt_ids or [], ex.completion_ids):
            h.update(array("q", ids).tobytes() + b"|")
        if ex.loss_mask is not None:  # which tokens are trained (None: all, as before)
            h.update(b"mask" + bytes(ex.loss_mask) + b"|")
    return "token ids sha256 " + h.hexdigest()[:12]


def save_checkpoint(
    path: Path,
    params: dict[str, torch.Tensor],
    opt: torch.optim.Optimizer,
    state: LoopState,
    metrics: list[dict],
    base_val: dict | None,
    teacher_val: dict | None,
    identity: dict[str, Any],
) -> None:
    ck = {
        "params": {k: v.detach().cpu() for k, v in params.items()},
        "optimizer": opt.state_dict(),
        "state": dict(vars(state)),
        "base_val": base_val,
        "teacher_val": teacher_val,
        "metrics": metrics,
        "identity": identity,
    }
    buf = io.BytesIO()
    torch.save(ck, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(
    path: Path,
    params: dict[str, torch.Tensor],
    opt: torch.optim.Optimizer,
    identity: dict[str, Any] | None = None,
) -> tuple[LoopState, list[dict], dict | None, dict | None]:
    """Restore params and optimizer in place; returns (state, metrics, base_val, teacher_val).

    identity (`run_identity` of the resuming fit): FitError naming every setting that
    differs from the checkpoint's, as `field: old -> new`, before anything is restored.
    """
    ck = torch.load(path, weights_only=False)
    if identity is not None:
        check_resumable(path, ck, params, identity)
    with torch.no_grad():
        for k, v in params.items():
            v.copy_(ck["params"][k])
    opt.load_state_dict(ck["optimizer"])
    return LoopState(**ck["state"]), list(ck["metrics"]), ck["base_val"], ck["teacher_val"]


def check_resumable(
    path: Path, ck: dict, params: dict[str, torch.Tensor], identity: dict[str, Any]
) -> None:
    """FitError listing `field: old -> new` for each setting the checkpoint differs in."""
    old = ck.get("identity") or {
        k: v
        for k, v in json.loads(json.dumps(ck.get("config", {}), default=str)).items()
        if k not in RESUME_MAY_CHANGE
    }
    diffs = [
        f"{k}: {_show(old.get(k))} -> {_show(identity.get(k))}"
        for k in [*identity, *(k for k in old if k not in identity)]
        if k in old and old.get(k) != identity.get(k)
    ]
    saved = {k: tuple(v.shape) for k, v in ck["params"].items()}
    now = {k: tuple(v.shape) for k, v in params.items()}
    if saved != now and not diffs:
        gone = sorted(set(saved) ^ {k for k in now if saved.get(k) == now[k]})
        diffs.append(f"trained tensors: {len(saved)} -> {len(now)} (first differing: {gone[0]})")
    if diffs:
        raise FitError(
            f"Cannot resume from {path}: this fit's settings differ from the checkpoint's "
            f"({'; '.join(diffs)}). Resume with the checkpoint's settings, or start again "
            "with --overwrite (or another --out)."
        )


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def kept_message(ckpt_path: Path | None) -> str:
    """Where the last good checkpoint is (for the message of a fit that had to stop)."""
    if ckpt_path is None or not ckpt_path.exists():
        return "No checkpoint was written yet."
    step = torch.load(ckpt_path, weights_only=False)["state"]["step"]
    return f"The last good checkpoint (step {step}) is kept at {ckpt_path}."


# what a fit (vectors, LoRA or full finetune) writes into its output folder
FIT_FILES = (
    "vectors.safetensors",
    "adapter.safetensors",
    "adapter_model.safetensors",
    "model.safetensors",
    "result.json",
    "metrics.jsonl",
    "metrics.csv",
    "checkpoint.pt",
    "config.json",
    "lora.json",
)


def check_out_dir(out: str | Path, overwrite: bool = False, resume: bool = False) -> None:
    """FitError unless a fit may write into `out`: a folder holding an earlier fit's files
    is refused (nothing is touched) unless `overwrite` (replace them) or `resume` (continue
    from its checkpoint.pt)."""
    out = Path(out)
    if overwrite and resume:
        raise FitError("Give --overwrite (start again) or --resume (continue), not both.")
    if out.exists() and not out.is_dir():
        raise FitError(f"--out {out} is a file; give a folder for the fit's files.")
    found = [name for name in FIT_FILES if (out / name).exists()]
    if not found or overwrite:
        return
    if resume:
        if (out / "checkpoint.pt").exists():
            return
        raise FitError(
            f"Nothing to resume in {out}: it has no checkpoint.pt (it holds {', '.join(found)}); "
            "use --overwrite to start again there, or another --out."
        )
    raise FitError(
        f"{out} already holds a fit ({', '.join(found)}); use --overwrite to replace it, "
        "--resume to continue it from its checkpoint, or another --out."
    )
