"""Real finetunes on the same data with the same loop and metrics: LoRA (PEFT) and full.

A vector set is only interesting next to what a real finetune does, so:

    fit_lora(lm, data, cfg, LoraConfig(r=8, alpha=8))      -> FinetuneResult
    fit_full(lm, data, cfg)                                  -> FinetuneResult
    kl_between(ctx_a, ctx_b, texts, tokenizer)               -> mean per-token KL(a || b)

`ctx_a` / `ctx_b` are zero-argument callables returning a context manager that yields a
model (`base_context(lm)`, `vector_context(lm, vectors)`, `result.context()` of a
finetune), so two variants of the same weights are never active at once.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..dtypes import dtype_name
from ..interpret.variants import (  # noqa: F401 (re-exported)
    ModelContext,
    base_context,
    kl_between,
    peft_context,
    vector_context,
)
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..models import LoadedModel, unwrap, wrap_model
from ..replay import full_hidden
from .api import Data, model_provenance, prepare_fit, resumes
from .config import FitConfig, FitResult, LoraConfig, make_config
from .data import Batch, TeacherLike
from .losses import lm_of, model_losses
from .online import Target, online_losses
from .students import Student


@dataclass
class FinetuneResult(FitResult):
    """A FitResult whose trained thing is a LoRA adapter or a full copy of the model."""

    kind: str = "lora"
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # trained tensors (cpu)
    lora: LoraConfig | None = None
    lm: Any = None
    model: nn.Module | None = None  # full finetune: the finetuned copy

    def context(self) -> AbstractContextManager[nn.Module]:
        """Context manager yielding the finetuned model (LoRA is injected, then removed)."""
        if self.kind == "full":
            return _yield(self.model)
        return lora_context(self.lm, self.lora, self.state)  # type: ignore[arg-type]


@contextmanager
def _yield(m: Any) -> Iterator[Any]:
    yield m


def lora_context(
    lm: LoadedModel | nn.Module, lora: LoraConfig, state: Mapping[str, torch.Tensor]
) -> AbstractContextManager[nn.Module]:
    """Inject LoRA with trained weights into the base model for the block; removed on exit
    (interpret.variants.peft_context: the one way a PEFT adapter is applied for a while)."""
    return peft_context(lm, lora.peft_config(unwrap(lm)), state)


class ModuleStudent(Student):
    """Trains parameters of a whole module (a PEFT model or a full copy) with full forwards."""

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor]):
        self.module = module
        self.model = module
        self.params = params

    def losses(
        self, batch: Batch, key: Any, objective: str, target: Target | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if objective == "online" and target is not None:  # fit.online
            hidden = full_hidden(self.module, batch.input_ids, batch.attention_mask)
            return online_losses(lm_of(self.module), hidden, batch, target)
        return model_losses(self.module, batch, objective)

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        yield self.module


def fit_lora(
    lm: LoadedModel | nn.Module,
    data: Data,
    config: FitConfig | None = None,
    lora: LoraConfig | None = None,
    *,
    teacher: TeacherLike = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """LoRA finetune (PEFT) with the same objective, loop, metrics and files as `fit`.

    The base model is left unchanged afterwards; use `result.context()` to run the finetune.
    Files in out_dir: adapter.safetensors (+ lora.json), metrics.jsonl/.csv, result.json,
    and the PEFT adapter files (adapter_config.json, adapter_model.safetensors), so out_dir
    is a folder `teachers.load_adapted` (and PEFT) load: `--teacher adapter --adapter OUT`.
    on_step(step, row): called after each optimizer step (see `watch_module`).
    """
    from peft import get_peft_model, get_peft_model_state_dict

    cfg = make_config(config, overrides)
    lora = lora or LoraConfig()
    # scored now, before LoRA is injected into the model (unless resuming: the checkpoint's)
    d = prepare_fit(lm, data, cfg, teacher, score=not resumes(out_dir, resume))
    cfg = d.config(cfg)  # objective "auto" resolved
    model = unwrap(lm)
    torch.manual_seed(cfg.seed)  # LoRA A init
    peft_model = get_peft_model(model, lora.peft_config(model), autocast_adapter_dtype=True)
    try:
        # PEFT keeps the adapter weights in float32 on a bfloat16 / float16 model
        # (autocast_adapter_dtype), so the trained weights and optimiser state are float32
        params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        prov = {
            **model_provenance(lm, cfg),
            "teacher": d.teacher,
            "lora": lora.model_dump(),
            "train_dtype": dtype_name(next(iter(params.values())).dtype),
        }

        def save(out: Path, p: dict[str, torch.Tensor], summary: dict) -> None:
            sd = _cpu(get_peft_model_state_dict(peft_model))
            atomic_write_bytes(out / "adapter.safetensors", _safetensors_bytes(sd))
            described = {**lora.model_dump(), "target_modules": str(lora.target_modules)}
            atomic_write_json(out / "lora.json", {"lora": described, **prov})
            _save_peft_adapter(peft_model, out)

        student = ModuleStudent(peft_model, params)
        watch_module(on_step, peft_model)
        res = d.train_student(
            student,
            cfg,
            out_dir=out_dir,
            resume=resume,
            prov=prov,
            save_params=save,
            on_step=on_step,
        )
        state = {k: v.clone() for k, v in _cpu(get_peft_model_state_dict(peft_model)).items()}
    finally:
        peft_model.unload()
        model.requires_grad_(False)
    return _finetune_result(res, params, kind="lora", state=state, lora=lora, lm=lm)


def fit_full(
    lm: LoadedModel | nn.Module,
    data: Data,
    config: FitConfig | None = None,
    *,
    teacher: TeacherLike = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """Full finetune of a copy of the model (the original stays untouched).

    The copy trains in float32 whatever the model's dtype (a bfloat16 weight has 8 bits of
    mantissa: an update below 1/256 of the weight is lost), so the trained weights and
    the optimiser state are float32, and model.safetensors holds float32 weights
    (provenance: "train_dtype"). After training the copy is cast back to the model's
    dtype, so `result.context()` runs it like the base model.
    Files in out_dir: model.safetensors and the model's config.json (a folder
    `teachers.load_adapted` and `from_pretrained` load), metrics.jsonl/.csv, result.json.
    on_step(step, row): called after each optimizer step (see `watch_module`).
    """
    cfg = make_config(config, overrides)
    d = prepare_fit(lm, data, cfg, teacher, score=False)  # scored in d.train_student
    cfg = d.config(cfg)  # objective "auto" resolved
    model_dtype = unwrap(lm).dtype
    model = copy.deepcopy(unwrap(lm)).float()
    model.config.dtype = torch.float32  # what model.safetensors holds
    model.requires_grad_(True)
    params = {n: p for n, p in model.named_parameters()}
    prov = {
        **model_provenance(lm, cfg),
        "teacher": d.teacher,
        "baseline": "full",
        "train_dtype": "float32",
    }

    def save(out: Path, p: dict[str, torch.Tensor], summary: dict) -> None:
        sd = _cpu(model.state_dict())
        atomic_write_bytes(out / "model.safetensors", _safetensors_bytes(_untie(sd)))
        atomic_write_text(out / "config.json", model.config.to_json_string())

    student = ModuleStudent(model, params)
    watch_module(on_step, model)
    res = d.train_student(
        student, cfg, out_dir=out_dir, resume=resume, prov=prov, save_params=save, on_step=on_step
    )
    model.requires_grad_(False)
    model.to(model_dtype)
    model.config.dtype = model_dtype
    model.eval()
    return _finetune_result(res, params, kind="full", state={}, lm=lm, model=model)


def watch_module(on_step: Any, module: nn.Module) -> None:
    """Give an on_step callback with a `watch(module)` method (fit.alignment.AlignmentLogger)
    the module being trained, before the first step: the LoRA-injected model or the full
    finetune's copy (which the caller never sees until the fit returns)."""
    watch = getattr(on_step, "watch", None)
    if callable(watch):
        watch(module)


@torch.no_grad()
def perturbed_copy(
    lm: LoadedModel | nn.Module, scale: float, seed: int = 0
) -> LoadedModel | nn.Module:
    """A copy of the model whose every weight tensor W is W + scale * |W| * e / |e|, e a
    seeded standard normal: each tensor's relative change |W' - W| / |W| equals `scale`.

    The different-initialisation control: a student that starts near, but not at, the
    teacher's weights. Tied tensors (embeddings = unembedding) stay tied. Returns the same
    kind it was given (a LoadedModel keeps its tokenizer; its weights hash is recomputed).
    """
    if scale < 0:
        raise ValueError(f"perturbed_copy: scale must be >= 0, got {scale}")
    model = copy.deepcopy(unwrap(lm))
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for _, p in sorted(model.named_parameters(remove_duplicate=True), key=lambda kv: kv[0]):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        e = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        w = p.detach().float()
        step = e * (scale * float(w.norm()) / max(float(e.norm()), 1e-12))
        p.copy_((w + step.to(w.device)).to(p.dtype))
    if isinstance(lm, LoadedModel):
        return wrap_model(model, lm.tokenizer, spec=f"{lm.spec}+perturbed({scale},{seed})")
    return model


def _finetune_result(res: FitResult, params: dict[str, torch.Tensor], **kw: Any) -> FinetuneResult:
    n_trainable = sum(v.numel() for v in params.values())
    return FinetuneResult(
        **{**res.__dict__, "extra": {**res.extra, "n_trainable": n_trainable}}, **kw
    )


def _save_peft_adapter(peft_model: nn.Module, out: Path) -> None:
    """PEFT's own adapter files in `out`, each moved into place whole (no partial file)."""
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        peft_model.save_pretrained(tmp)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            os.replace(Path(tmp) / name, out / name)


def _cpu(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def _safetensors_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(sd)


def _untie(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied embeddings): clone duplicates."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out
