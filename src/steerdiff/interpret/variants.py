"""Variants of one model as context managers, and the per-token KL between two of them.

A *ModelContext* is a zero-argument callable returning a context manager that yields a
model. Entering it switches the variant on, leaving it switches it off, so two variants of
the same weights (base, base + vectors, base + a LoRA adapter) are never active at once:

    base_context(lm)                         the model as loaded
    vector_context(lm, vectors, coeff)()     base + vectors at every position (hooks.steer)
    adapter_context(lm, "runs/lora")         a PEFT adapter folder applied for the block
    peft_context(lm, peft_config, state)     a LoRA from its config and trained tensors
    model_context(other)                     a separate model (a full finetune)
    finetune_context(lm, finetuned)          any of the above from what a user passes

    token_kls(contexts, pairs, ids)          per-text sums of per-token KL(a || b) and counts

fit.baselines re-exports these (kl_between, lora_context); the lens and faithfulness use them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import check_adapter_base
from ..errors import SteerdiffError
from ..hooks import family_of, steer
from ..models import LoadedModel, load_model, unwrap
from ..progress import progress as progress_bar
from ..teachers import load_adapted

ModelContext = Callable[[], AbstractContextManager[nn.Module]]


class VariantError(SteerdiffError, ValueError):
    """A finetune that cannot be compared with this base model; the message says why."""


@contextmanager
def base_context(lm: LoadedModel | nn.Module) -> Iterator[nn.Module]:
    """The model as loaded."""
    yield unwrap(lm)


@contextmanager
def model_context(model: LoadedModel | nn.Module) -> Iterator[nn.Module]:
    """A separate model (a full finetune) as a variant: nothing to switch on or off."""
    yield unwrap(model)


def vector_context(
    lm: LoadedModel | nn.Module, vectors: Mapping[str, torch.Tensor], coeff: float = 1.0
) -> ModelContext:
    """A ModelContext for base + vectors at all positions."""

    @contextmanager
    def ctx() -> Iterator[nn.Module]:
        with steer(unwrap(lm), vectors, coeff):
            yield unwrap(lm)

    return ctx


@contextmanager
def _applied(peft_model: Any) -> Iterator[Any]:
    """A PEFT model in eval mode for the block; its LoRA layers removed on exit."""
    try:
        peft_model.eval()
        yield peft_model
    finally:
        peft_model.unload()  # the base model is as before


@contextmanager
def peft_context(
    lm: LoadedModel | nn.Module, peft_config: Any, state: Mapping[str, torch.Tensor]
) -> Iterator[nn.Module]:
    """Inject a LoRA (a peft config and its trained tensors) for the block; removed on exit."""
    from peft import get_peft_model, set_peft_model_state_dict

    with _applied(get_peft_model(unwrap(lm), peft_config)) as pm:
        set_peft_model_state_dict(pm, dict(state))
        pm.eval()
        yield pm


@contextmanager
def adapter_context(lm: LoadedModel | nn.Module, folder: str | os.PathLike) -> Iterator[Any]:
    """A PEFT adapter folder applied to the model for the block (yields the PeftModel:
    `pm.disable_adapter()` runs the base inside it); removed on exit. An adapter made for
    another base model fails first, in one line (teachers.check_adapter_base)."""
    check_adapter_base(folder, lm)
    from peft import PeftModel

    with _applied(PeftModel.from_pretrained(unwrap(lm), str(folder))) as pm:
        yield pm


def is_adapter_folder(x: Any) -> bool:
    return isinstance(x, (str, Path)) and (Path(x) / "adapter_config.json").is_file()


@dataclass
class Finetune:
    """What `resolve_finetune` makes of a user's finetune: an adapter folder (applied per
    use) or a loaded model (kept), and how to describe it."""

    context: ModelContext
    lens_arg: Any  # what interpret.lens.activation_difference_lens takes as finetuned=
    kind: str  # "adapter", "model" or "in-memory"
    spec: str


def resolve_finetune(lm: LoadedModel | nn.Module, finetuned: Any) -> Finetune:
    """A finetune given as a PEFT adapter folder, a finetuned model folder or spec, a
    LoadedModel / HF model, or anything with a `.context()` (fit.FinetuneResult).
    A model folder or spec is loaded once here (in the base model's dtype)."""
    if is_adapter_folder(finetuned):
        check_adapter_base(finetuned, lm)
        return Finetune(
            lambda: adapter_context(lm, finetuned), str(finetuned), "adapter", str(finetuned)
        )
    if hasattr(finetuned, "context") and callable(finetuned.context):
        ctx = finetuned.context
        return Finetune(ctx, None, "in-memory", type(finetuned).__name__)
    if isinstance(finetuned, (str, Path)):
        hf = unwrap(lm)
        if (Path(finetuned) / "config.json").is_file() and isinstance(lm, LoadedModel):
            finetuned = load_adapted(finetuned, lm)
        else:
            finetuned = load_model(str(finetuned), dtype=hf.dtype)
    ft, hf = unwrap(finetuned), unwrap(lm)
    if (
        ft.config.hidden_size != hf.config.hidden_size
        or family_of(ft) != family_of(hf)
        or ft.config.vocab_size != hf.config.vocab_size
    ):
        raise VariantError(
            f"The finetuned model ({ft.config.model_type}, d_model={ft.config.hidden_size}, "
            f"vocab={ft.config.vocab_size}) does not match the base ({hf.config.model_type}, "
            f"d_model={hf.config.hidden_size}, vocab={hf.config.vocab_size}): pass a finetune "
            "of this base model."
        )
    spec = str(getattr(finetuned, "spec", None) or getattr(ft, "name_or_path", "") or "model")
    return Finetune(lambda: model_context(ft), finetuned, "model", spec)


def encode(
    texts: Sequence[str] | Sequence[Sequence[int]], tokenizer: Any, max_len: int
) -> list[list[int]]:
    """Strings (with a tokenizer) or token-id lists -> token-id lists of at most max_len."""
    if texts and isinstance(texts[0], str):
        if tokenizer is None:
            raise ValueError("kl_between on strings needs a tokenizer")
        enc = tokenizer(list(texts), truncation=True, max_length=max_len)
        return [list(x) for x in enc["input_ids"]]
    return [list(t)[:max_len] for t in texts]


def _logps(ctx: ModelContext, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Next-token log-probs [n real tokens, V] (cpu, float32) of one variant."""
    with ctx() as model:
        dev = next(model.parameters()).device
        out = model(input_ids=x.to(dev), attention_mask=m.to(dev))
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        return logp[m.bool().to(dev)].cpu()


@torch.no_grad()
def token_kls(
    contexts: Mapping[str, ModelContext],
    pairs: Sequence[tuple[str, str]],
    ids: Sequence[Sequence[int]],
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = False,
) -> tuple[dict[tuple[str, str], torch.Tensor], torch.Tensor]:
    """Per-token KL(a || b) between next-token distributions, for each pair (a, b) of named
    contexts, summed per text: ({pair: [n_texts] float64 sums}, [n_texts] token counts).

    Each context is entered once per batch and left before the next is entered. Texts run
    in length order, right-padded (padding is never counted); results are in input order.
    """
    names = sorted({n for p in pairs for n in p})
    n = len(ids)
    sums = {p: torch.zeros(n, dtype=torch.float64) for p in pairs}
    counts = torch.tensor([len(x) for x in ids], dtype=torch.float64)
    order = sorted(range(n), key=lambda i: len(ids[i]))
    with progress_bar(n, "kl", disable=not progress) as bar:
        for s in range(0, n, batch_size):
            rows = [i for i in order[s : s + batch_size] if len(ids[i]) > 0]
            if not rows:
                continue
            L = max(len(ids[i]) for i in rows)
            x = torch.full((len(rows), L), pad_id, dtype=torch.long)
            m = torch.zeros((len(rows), L), dtype=torch.long)
            for j, i in enumerate(rows):
                x[j, : len(ids[i])], m[j, : len(ids[i])] = torch.tensor(list(ids[i])), 1
            which = m.bool().nonzero()[:, 0]  # [n tokens] the row of each real token
            lp = {name: _logps(contexts[name], x, m) for name in names}
            for a, b in pairs:
                kl = (lp[a].exp() * (lp[a] - lp[b])).sum(-1).double()  # [n tokens]
                per_row = torch.zeros(len(rows), dtype=torch.float64).index_add(0, which, kl)
                sums[(a, b)][rows] = per_row
            bar.update(len(rows))
    return sums, counts


def kl_between(
    model_a_ctx: ModelContext,
    model_b_ctx: ModelContext,
    texts: Sequence[str] | Sequence[Sequence[int]],
    tokenizer: Any = None,
    batch_size: int = 8,
    max_len: int = 128,
) -> float:
    """Mean over real tokens of KL(p_a || p_b) between next-token distributions on texts.

    texts: strings (give the tokenizer) or token-id lists. Each context is entered once
    per batch and left before the other is entered, so both can be variants of the same
    underlying weights (base, +vectors, +LoRA)."""
    ids = encode(texts, tokenizer, max_len)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    sums, counts = token_kls(
        {"a": model_a_ctx, "b": model_b_ctx}, [("a", "b")], ids, batch_size, pad
    )
    return float(sums[("a", "b")].sum()) / max(float(counts.sum()), 1.0)
