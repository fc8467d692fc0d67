"""What a fit is told (FitConfig, LoraConfig) and what it returns (FitResult)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from ..budget import parse_budget
from ..errors import SteerdiffError
from ..vectors import VectorSet

# defaults chosen by measurement (docs/fit.md "Which objective"; bench/bench_online.py)
LR_DEFAULT = 0.05  # in activation units: a vector can grow by ~5% of its hook's norm a step
EPOCHS_DEFAULT = 20  # an upper bound: the convergence rule usually stops a fit before
CONVERGE_TOL_DEFAULT = 0.01
# basis "sae": the L1 weight, nats/token per unit of sum_i |z_i| ||W_dec[i]|| (docs/sae-fit.md)
L1_DEFAULT = 1e-4
LR_ABSOLUTE_BEFORE = 0.01  # the default before activation units (and for module baselines)

# the modules the subliminal-learning paper puts LoRA on (llama-style names)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FitError(SteerdiffError, ValueError):
    """Bad data, bad config, or a fit that had to stop; the message says what to do."""


class FitConfig(BaseModel):
    """How to fit. Hooks are patterns for `select_hooks` (globs, braces, layer ranges)."""

    model_config = ConfigDict(extra="forbid")

    hooks: list[str] = Field(
        ["blocks.*.attn.hook_{q,k,v}"],
        description="hook pattern(s), repeatable, e.g. 'blocks.*.attn.hook_{q,k,v}'",
    )
    objective: Literal["auto", "sft", "distill", "online"] = Field(
        "auto",
        description="auto = online when the data's manifest (or teacher=) names a teacher "
        "that can run here (steered, prompt, adapter), else distill when every row carries "
        "top-k log-probs, else sft; online = KL to the teacher's full next-token "
        "distribution, computed during the fit (docs/fit.md: Which objective)",
    )
    online_prompt_positions: bool = Field(
        False,
        description="online: also take the KL at prompt positions (teacher and student "
        "prompts must be the same tokens)",
    )
    optimizer: Literal["adam", "adamw", "sgd", "signsgd"] = "adam"
    lr: float = Field(
        LR_DEFAULT,
        description="learning rate (lr_units activation: a vector's step is about lr x its "
        "hook's activation RMS per coordinate)",
    )
    lr_units: Literal["activation", "absolute"] = Field(
        "activation",
        description="activation: each hook's vector is trained as v = s x u, s = its hook's "
        "activation RMS measured at the fit's start (lr in units of s); absolute: plain lr",
    )
    momentum: float = Field(0.0, description="sgd / signsgd momentum")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam / adamw betas (two numbers)")
    weight_decay: float = Field(0.0, description="weight decay")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="lr schedule after the warmup (cosine decays to 0)"
    )
    warmup_steps: int = Field(2, description="linear warmup steps")
    init: Literal["zero", "random"] = "zero"
    init_scale: float = Field(0.01, description="std of the seeded random init")
    max_norm: float | None = Field(
        None, description="cap each vector's norm (L2, after every step)"
    )
    grad_clip: float | None = Field(None, description="clip the gradient norm")
    epochs: int = Field(
        EPOCHS_DEFAULT,
        description="at most this many passes over the training rows (the fit stops "
        "earlier when it converges: see converge_tol)",
    )
    max_steps: int | None = Field(
        None, description="stop after this many optimizer steps (before epochs end)"
    )
    batch_size: int = Field(16, description="rows per optimizer step (global, over all ranks)")
    micro_batch_size: int | None = Field(
        None, description="rows per forward (< batch_size: gradient accumulation)"
    )
    val_fraction: float = Field(0.2, description="validation fraction")
    val_size: int | None = Field(None, description="validation rows (overrides val_fraction)")
    eval_every: int = Field(0, description="evaluate every N steps (0 = each epoch)")
    early_stopping_patience: int | None = Field(
        None, description="early stopping patience (evaluations without improvement)"
    )
    converge_tol: float | None = Field(
        CONVERGE_TOL_DEFAULT,
        description="stop ('converged') when the last converge_patience evaluations improved "
        "the best validation loss by less than this fraction of it (0 or None: run all epochs)",
    )
    converge_patience: int = Field(2, description="evaluations the converge_tol rule looks back")
    checkpoint_every: int = Field(50, description="checkpoint every N steps")
    cache_prefix: bool = Field(
        True, description="run the layers below the first trainable hook once per batch"
    )
    cache_across_epochs: bool = Field(True, description="keep that prefix cache across epochs")
    cache_budget: str | None = Field(
        None,
        description="RAM for each of the fit's caches (prefix activations, top-k log-probs), "
        "e.g. '4GB' or '25%' (default: $STEERDIFF_MEMORY_BUDGET, else 25% of RAM); beyond "
        "it a cache spills to a memory-mapped temporary file",
    )
    max_len: int | None = Field(
        None,
        description="chat rows longer than this (tokens) are left out; documents are chunked to it",
    )
    constrained_scoring: bool = Field(
        True,
        description="score base, teacher and student under the dataset's decoding constraint "
        "(renormalised over the tokens it allowed at each step)",
    )
    basis: Literal["residual", "sae"] = Field(
        "residual",
        description="residual: free vectors; sae: at the SAE's hook, v = z @ W_dec with a "
        "code z over the latents of --sae, trained with an L1 penalty (docs/sae-fit.md)",
    )
    sae: str | None = Field(
        None, description="basis sae: the SAE (folder, params.npz or hf:ORG/REPO/FOLDER)"
    )
    l1: float = Field(
        L1_DEFAULT,
        description="basis sae: loss += l1 x sum_i |z_i| ||W_dec[i]|| (the code's L1 penalty)",
    )
    whiten: str | None = Field(
        None,
        description="the Gaussians whitened norms are measured in (docs/steering-toolbox.md: "
        "Whitened fits): a saved Gaussian file (one hook), a folder with one <hook>.safetensors "
        "per fitted hook, or 'auto' (fit one per hook on the offline corpus at the fit's start, "
        "kept in --out/whiten/ for a resume); alone it records each vector's Mahalanobis norm",
    )
    whiten_texts: int = Field(
        200, description="whiten 'auto': corpus texts each Gaussian is fitted on"
    )
    whiten_penalty: float = Field(
        0.0,
        description="loss += whiten_penalty x sum over hooks of ||v||_M^2 = v^T cov^-1 v "
        "(the whitened norm squared; needs whiten)",
    )
    whiten_max_norm: float | None = Field(
        None,
        description="cap each vector's Mahalanobis norm ||v||_M (after every step, like "
        "max_norm; needs whiten)",
    )
    seed: int = Field(0, description="seed (split, order, init)")
    progress: bool = Field(True, description="show a progress bar")

    @field_validator("batch_size", "epochs")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("cache_budget")
    @classmethod
    def _budget(cls, v: str | None) -> str | None:
        if v is not None:
            parse_budget(v, "cache_budget")  # BudgetError (a ValueError) names the fix
        return v

    @field_validator("l1")
    @classmethod
    def _l1(cls, v: float) -> float:
        if not v >= 0:
            raise ValueError(f"l1 must be >= 0 (0: no penalty), got {v}")
        return v

    @field_validator("whiten_penalty")
    @classmethod
    def _whiten_penalty(cls, v: float) -> float:
        if not v >= 0:
            raise ValueError(f"whiten_penalty must be >= 0 (0: no penalty), got {v}")
        return v

    @field_validator("whiten_max_norm")
    @classmethod
    def _whiten_max_norm(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"whiten_max_norm must be > 0 (leave it unset for no cap), got {v}")
        return v

    @field_validator("whiten_texts")
    @classmethod
    def _whiten_texts(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"whiten_texts must be >= 2 (texts to fit a Gaussian on), got {v}")
        return v

    @model_validator(mode="after")
    def _whiten(self) -> FitConfig:
        for name in ("whiten_penalty", "whiten_max_norm"):
            if getattr(self, name) not in (None, 0.0) and not self.whiten:
                raise ValueError(
                    f"{name} needs whiten: give --whiten PATH (a Gaussian file, or a folder of "
                    "<hook>.safetensors) or --whiten auto"
                )
        if self.whiten and self.basis == "sae":
            raise ValueError(
                "whiten is for basis 'residual' (free vectors); a basis 'sae' code has its L1 "
                "penalty: drop --whiten, or fit with --basis residual"
            )
        return self

    @model_validator(mode="after")
    def _basis(self) -> FitConfig:
        if self.basis == "sae" and not self.sae:
            raise ValueError("basis 'sae' needs sae: give --sae PATH (an SAE at the fit's hook)")
        if self.basis == "residual" and self.sae:
            raise ValueError(f"sae {self.sae!r} is only read with basis 'sae': add --basis sae")
        return self

    @property
    def micro(self) -> int:
        """Rows per forward pass."""
        return self.micro_batch_size or self.batch_size


def make_config(config: FitConfig | None, overrides: dict[str, Any]) -> FitConfig:
    """`config` (default FitConfig()) with keyword overrides, validated."""
    cfg = (config or FitConfig()).model_copy(update=overrides)
    FitConfig.model_validate(cfg.model_dump())
    return cfg


class LoraConfig(BaseModel):
    """LoRA settings for the finetune baseline. target_modules None = LLAMA_TARGETS (the
    paper's q,k,v,o,gate,up,down) when the model has them, else PEFT's "all-linear"."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, gt=0, validation_alias=AliasChoices("r", "rank"))  # experiment files: rank
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None

    def peft_config(self, model: nn.Module) -> Any:
        """The peft.LoraConfig for `model`."""
        from peft import LoraConfig as PeftLoraConfig

        targets: Any = self.target_modules
        if targets is None:
            names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
            targets = list(LLAMA_TARGETS) if set(LLAMA_TARGETS) <= names else "all-linear"
        return PeftLoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            bias="none",
        )


@dataclass
class FitResult:
    vectors: VectorSet | None  # None for baselines (see baselines.FinetuneResult)
    metrics: list[dict]
    base_val_loss: float | None
    teacher_val_loss: float | None
    fitted_val_loss: float | None
    gap_closed: float | None
    steps: int
    stopped: str  # "done" | "max_steps" | "early_stopping" | "converged"
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
