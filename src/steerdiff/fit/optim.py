"""Optimizers and the learning-rate schedule of a fit.

Learning rate in activation units (FitConfig.lr_units = "activation", vector fits): each
hook's vector v is trained as if it were v = s * u with u the parameter, where s is the
hook's activation RMS per coordinate (measured on the first training rows at the fit's
start, `Student.activation_scales`). Training u with lr is the same as training v with a
per-hook parameter group whose lr and weight decay are rescaled (UNIT_POWERS):

    optimizer  v's lr   v's weight_decay   why
    adam       lr*s     wd/s^2             Adam's step ignores the gradient's scale: dv = s*du;
                                           L2 decay wd*u is wd*v/s in u's gradient
    adamw      lr*s     wd/s               decoupled decay: v *= 1 - lr*wd, as u does
    signsgd    lr*s     wd/s               sign steps, decoupled decay as adamw
    sgd        lr*s^2   wd/s^2             grad_u = s*grad_v and dv = s*du

(Adam's eps is the one difference: it acts as eps/s on v.) So a step moves a vector by
about lr times its hook's typical activation size whatever the hook (q/k/v outputs, the
residual stream, MLP inputs differ by orders of magnitude), and one lr serves every hook.
The vectors stay the parameters (checkpoints, max_norm, steering: unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .config import FitConfig


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


# (power of s in the lr, power of s in the weight decay) of a vector trained as v = s * u
UNIT_POWERS = {"adam": (1, -2), "adamw": (1, -1), "signsgd": (1, -1), "sgd": (2, -2)}


def param_groups(
    params: list[torch.Tensor] | dict[str, torch.Tensor],
    cfg: FitConfig,
    scales: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One group (all parameters, lr_scale 1) without scales; else one group per named
    tensor with lr_scale = s^p and weight_decay = wd * s^q (UNIT_POWERS[cfg.optimizer])."""
    if scales is None or not isinstance(params, dict):
        tensors = list(params.values()) if isinstance(params, dict) else list(params)
        return [dict(params=tensors, lr_scale=1.0, weight_decay=cfg.weight_decay)]
    p_lr, p_wd = UNIT_POWERS[cfg.optimizer]
    return [
        dict(
            params=[v],
            lr_scale=scales[name] ** p_lr,
            weight_decay=cfg.weight_decay * scales[name] ** p_wd,
        )
        for name, v in params.items()
    ]


def make_optimizer(
    params: list[torch.Tensor] | dict[str, torch.Tensor],
    cfg: FitConfig,
    scales: dict[str, float] | None = None,
) -> torch.optim.Optimizer:
    """cfg.optimizer over `params`; scales ({name: s}, with params a dict): learning rate
    in activation units (see the module docstring). `set_lr` sets each group's lr."""
    groups = param_groups(params, cfg, scales)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return SignSGD(groups, lr=cfg.lr, momentum=cfg.momentum)


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


def set_lr(opt: torch.optim.Optimizer, lr: float) -> float:
    """Set every parameter group's learning rate to lr x its lr_scale; returns lr."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return lr
