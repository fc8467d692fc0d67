"""Shared prompt prefixes: the KV cache of the tokens every prompt starts with, computed once.

The prompts of a dataset mostly start with the same tokens (chat template, system prompt,
the start of the instruction). `generate.sample` runs those P tokens once, as a [1, P]
forward, keeps that cache for the whole call, and gives each batch a copy expanded to
its rows (a copy: decoding appends to it). The prefill then runs only each row's suffix,
left-padded, with the pads between the prefix and the suffix:

    cached once, batch 1        the batch's prefill [b, S]
    [ p0 p1 ... pP-1 ]          [ pad pad s0 s1 s2 ]    row 0
                                [ s0  s1  s2 s3 s4 ]    row 1

The pads are masked out and position ids come from the attention mask's cumsum, so every
real token sees the same tokens at the same positions as without sharing (equal up to
float rounding: the prefix ran as its own [1, P] matmuls). The prefix leaves at least one
token of every prompt in its suffix, so the last prompt token still gives the first logits
(identical prompts share all but their last token).

Under `hooks.steer(...)` the suffix forward runs inside `hooks.PROMPT_CONTINUES`, so
positions "prompt" / "response" treat prefix + suffix as the prompt, as in one prefill;
"first:k" counts real tokens through the attention mask, and "all" needs nothing. A
per-row coeff (a tensor [batch]) cannot steer a pass shared by all rows: hooks raises
HookError; pass share_prefix=False.

Not shared (whole prompts per row, as before): a model with sliding-window layers whose
window is shorter than the batch's longest sequence (prompt + new tokens), since the pads
inside the sequence would take places in the window and change what the model sees.

`shared_prefix_hidden` does the same for a teacher-forced pass over right-padded rows
(the teacher's losses and top-k log-probs in a fit): the prefix once, then the rest of
every row after it; there the pads are at the end, so sliding windows need no exception.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..hooks import PROMPT_CONTINUES


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Tokens shared by the start of every row, leaving at least one token per row."""
    n = min(len(r) for r in rows) - 1  # keep >= 1 token per row for the second pass
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return max(n, 0)


def sliding_window(config: Any) -> int | None:
    """The smallest sliding window among the layers of the cache HF builds for this model
    (None: no sliding-window layer)."""
    layers = DynamicCache(config=config).layers
    windows = [layer.sliding_window for layer in layers if getattr(layer, "is_sliding", False)]
    return min(windows) if windows else None


class SharedPrefix:
    """The prefix shared by all prompts of one `sample()` call and its KV cache (batch 1),
    computed on first use and reused by every batch."""

    def __init__(self, model: nn.Module, prompts: Sequence[Sequence[int]], **forward_kw: Any):
        self.model = model
        self.tokens = list(prompts[0][: common_prefix_len(prompts)]) if prompts else []
        self.window = sliding_window(model.config)
        self.forward_kw = forward_kw  # e.g. logits_to_keep=1
        self._cache: DynamicCache | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def fits(self, seq_len: int) -> bool:
        """Whether a batch whose sequences reach seq_len tokens (prompt + new) can use it."""
        return len(self.tokens) > 0 and (self.window is None or seq_len <= self.window)

    def cache_for(self, batch: int) -> DynamicCache:
        """A fresh cache holding the prefix for `batch` rows (the shared one stays unchanged)."""
        if self._cache is None:
            dev = next(self.model.parameters()).device
            ids = torch.tensor([self.tokens], device=dev)  # [1, P]
            self._cache = DynamicCache(config=self.model.config)
            self.model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                past_key_values=self._cache,
                use_cache=True,
                **self.forward_kw,
            )
        cache = copy.deepcopy(self._cache)
        cache.batch_repeat_interleave(batch)
        return cache


def suffix_batch(
    prompts: Sequence[Sequence[int]], skip: int, pad_id: int, new_tokens: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompts after their first `skip` (cached) tokens, left-padded into one batch.

    Returns ids [b, S], the attention mask [b, skip + S + new_tokens] (1 on the cached
    prefix and on real tokens, 0 on pads and on the columns of tokens not yet generated),
    and position ids [b, S] from the mask's cumsum (pads get 0). skip = 0: the whole
    prompts, left-padded as model.generate does.
    """
    width = max(len(p) for p in prompts) - skip
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((len(prompts), skip + width + new_tokens), dtype=torch.long, device=device)
    attn[:, :skip] = 1
    for r, p in enumerate(prompts):
        n = len(p) - skip
        ids[r, width - n :] = torch.tensor(p[skip:], device=device)
        attn[r, skip + width - n : skip + width] = 1
    seen = attn[:, : skip + width]
    pos = (seen.cumsum(-1) - 1).masked_fill(seen == 0, 0)[:, skip:]  # [b, S]
    return ids, attn, pos


@contextmanager
def continuing_prompt(on: bool = True) -> Iterator[None]:
    """Forwards inside are still the prompt for `hooks.steer` positions (if `on`)."""
    token = PROMPT_CONTINUES.set(True) if on else None
    try:
        yield
    finally:
        if token is not None:
            PROMPT_CONTINUES.reset(token)


def shared_prefix_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Final-normed hidden states [b, s, d] of right-padded rows (as replay.full_hidden),
    with the tokens every row starts with run once ([1, P]) and the rest of each row after
    them from that KV cache. Positions < P hold the prefix's states (the same in every row).
    Steering: only positions "all" with one coeff (the prefix pass has batch 1, and these
    passes of the decoder stack skip the model's forward, where steer tracks positions);
    exact then, up to float rounding."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    rows = [r[:n] for r, n in zip(input_ids.tolist(), attention_mask.sum(1).tolist(), strict=True)]
    p = common_prefix_len(rows)
    if p == 0:
        out = base.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state
    cache = DynamicCache(config=base.config)
    first = base.base_model(input_ids=input_ids[:1, :p], past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(input_ids.shape[0])
    rest = base.base_model(
        input_ids=input_ids[:, p:],
        attention_mask=attention_mask,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state  # [b, s - P, d]
    head = first.last_hidden_state.expand(input_ids.shape[0], -1, -1)  # [b, P, d]
    return torch.cat([head, rest], dim=1)
