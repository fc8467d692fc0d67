"""Fast batched sampling with a KV cache: our own decoding loop around the model's forward.

`sample()`:

* prompts are sorted by length and batched with left padding (less padding);
* the tokens all prompts start with (chat template, system prompt, ...) run once into a
  KV cache that every batch reuses (`generate.prefix`; share_prefix=False turns it off);
* the prefill runs once per batch and keeps only the last position's logits;
* keys/values go into HF's `DynamicCache` (a preallocated cache of strided views was
  tried and was slower under SDPA on CPU: 51-57 s vs 41 s for 32 x 48 tokens, 2 threads);
* each row stops on its own at a stop token; finished rows are dropped from
  the batch once a quarter of it is done, so the rest decodes faster;
* temperature / top-p / greedy (temperature 0), a seeded generator;
* optional constrained decoding: only `allowed_ids` (plus the stop tokens) can
  be sampled; the distribution is renormalised over them. Without top-k
  log-probs the unembedding is computed for those tokens only;
* optional top-k log-probabilities for every generated token, of the distribution it
  was drawn from at temperature 1 (before top-p): the model's full distribution, or
  under constrained decoding that distribution renormalised over what the token set and
  the grammar allowed at that step (then the full one is kept too, as `*_unconstrained`).

It calls the model's ordinary forward, so `hooks.steer(...)` works around it,
including positions="response" (the prefill is the prompt, shared prefix included)
and "first:k".

Greedy decoding reproduces `model.generate(do_sample=False)` token for token.
Dataset files (writing, resuming, reading) are in `generate.dataset`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..errors import SteerdiffError
from ..models import LoadedModel, unwrap
from .constraint import grammar_mask
from .prefix import SharedPrefix, continuing_prompt, suffix_batch

# ----------------------------------------------------------------------------- restricted head


class _SubsetHead(nn.Module):
    """The unembedding restricted to some vocabulary rows: [..., d_model] -> [..., n_allowed]."""

    def __init__(self, head: nn.Linear, ids: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(head.weight.detach()[ids].clone(), requires_grad=False)
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach()[ids].clone(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.contiguous(), self.weight, self.bias)


@contextmanager
def _contiguous_head_input(model: nn.Module) -> Iterator[None]:
    """Make the unembedding's input contiguous while sampling (a pre-hook, removed on exit).

    With logits_to_keep=1 HF unembeds hidden[:, -1:, :], a strided view of the prefill's
    hidden states; for such a 3-D input torch's CPU linear expands the weight to
    [batch, d_model, vocab] and copies it: 10 s instead of 0.06 s for a batch of 32 on
    the embedded model in bfloat16 (0.5 s instead of 0.06 s in float32; torch 2.13).
    """
    head = model.get_output_embeddings()
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _restricted_head(model: nn.Module, ids: torch.Tensor | None) -> Iterator[bool]:
    """Temporarily replace the output embedding by its `ids` rows (restored in finally).

    Yields True if the swap happened (logits then have len(ids) columns).
    """
    head = model.get_output_embeddings() if ids is not None else None
    if head is None or not isinstance(head, nn.Linear):
        yield False
        return
    name = next((n for n, m in model.named_modules() if m is head), None)
    if not name:
        yield False
        return
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, _SubsetHead(head, ids.to(head.weight.device)))
    try:
        yield True
    finally:
        setattr(parent, attr, head)


# ----------------------------------------------------------------------------- sampling


class SampleError(SteerdiffError, ValueError):
    """Bad arguments to the sampler; the message names them."""


@dataclass
class Sample:
    """One generated completion.

    token_ids: generated ids, including the stop token if one was produced.
    topk_ids / topk_logprobs: per generated token, the top-k of the distribution it was
      sampled from at temperature 1 (empty lists when k = 0). Under constrained decoding
      that is the model's distribution renormalised over the tokens allowed at that step,
      and a step that allowed fewer than k tokens has fewer entries (only allowed ones).
    topk_ids_unconstrained / topk_logprobs_unconstrained: [n_generated, k] the model's
      full-vocabulary top-k (constrained decoding with k > 0 only; else empty).
    """

    index: int  # position in the `prompts` list given to sample()
    token_ids: list[int]
    stopped: bool  # True if a stop token ended it (False: hit max_new_tokens)
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_logprobs: list[list[float]] = field(default_factory=list)
    topk_ids_unconstrained: list[list[int]] = field(default_factory=list)
    topk_logprobs_unconstrained: list[list[float]] = field(default_factory=list)


@dataclass
class SampleStats:
    """Counters of one `sample()` call (for tokens/s)."""

    prompt_tokens: int = 0  # real (unpadded) prompt tokens
    shared_tokens: int = 0  # of which read from the shared prefix's cache (not run per row)
    new_tokens: int = 0  # generated tokens kept (up to and incl. the stop token)
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def stop_token_ids(lm: LoadedModel | nn.Module, tokenizer: Any = None) -> list[int]:
    """End-of-turn ids: the generation config's eos ids, the tokenizer's eos, and the
    ChatML / Gemma / Llama-3 end-of-turn tokens if they are special tokens of the vocabulary."""
    model = unwrap(lm)
    tok = tokenizer if tokenizer is not None else getattr(lm, "tokenizer", None)
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if tok is not None:
        if tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
        vocab = tok.get_vocab()
        for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
            if t in vocab and t in (tok.all_special_tokens or []):
                ids.append(vocab[t])
    return sorted(set(int(i) for i in ids))


def _accepts(model: nn.Module, arg: str) -> bool:
    return arg in inspect.signature(model.forward).parameters


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (per row). [b, V]"""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already >= p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def _draw(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row from probs [b, V] by inverting the CDF (much cheaper than
    torch.multinomial on a large vocabulary on CPU). Zero-probability tokens are never drawn."""
    cdf = probs.cumsum(-1)  # [b, V]
    u = torch.rand(probs.shape[0], 1, generator=gen, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(probs.shape[-1] - 1).squeeze(-1)


def sample(
    model: LoadedModel | nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    batch_size: int = 32,
    allowed_ids: Sequence[int] | None = None,
    topk: int = 0,
    grammar: Any = None,
    pad_id: int | None = None,
    sort_by_length: bool = True,
    compact: bool = True,
    progress: Callable[[int], None] | None = None,
    stats: SampleStats | None = None,
    share_prefix: bool = True,
) -> list[Sample]:
    """Sample completions for tokenised prompts; returns one Sample per prompt, in order.

    prompts: token ids per prompt (chat template already applied).
    temperature: 0 for greedy decoding (= model.generate(do_sample=False)).
    stop_ids: tokens that end a row (default: `stop_token_ids(model)`); kept in token_ids.
    allowed_ids: constrained decoding; only these and the stop ids can be sampled.
    topk: store per token the top-k log-probs of the distribution sampled from, at
      temperature 1 and before top-p (with allowed_ids: renormalised over the allowed
      tokens; the full distribution's top-k then goes to topk_*_unconstrained).
    grammar: with allowed_ids, an object with mask(tokens so far, candidate ids) -> [bool]
      that narrows the allowed tokens per row and step (e.g. tasks.numbers.NumberListGrammar).
    progress: called with the number of prompts finished after each batch.
    stats: filled with token counts and seconds if given.
    share_prefix: run the tokens every prompt starts with once, into a KV cache that
      every batch reuses (see generate.prefix; not with sliding windows shorter than the
      sequences). Same tokens as without, up to float rounding.
    Works inside `hooks.steer(...)` (any positions; a per-row coeff tensor needs
    share_prefix=False) and with any family hooks supports.
    """
    hf = unwrap(model)
    if stop_ids is None:
        stop_ids = stop_token_ids(model)
    if pad_id is None:
        tok = getattr(model, "tokenizer", None)
        pad_id = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    if any(len(p) == 0 for p in prompts):
        raise SampleError("sample(): every prompt needs at least one token")
    if batch_size < 1 or max_new_tokens < 1:
        raise SampleError("sample(): batch_size and max_new_tokens must be >= 1")
    device = next(hf.parameters()).device
    allowed = None
    if allowed_ids is not None:
        allowed = torch.tensor(sorted(set(allowed_ids) | set(stop_ids)), device=device)
    order = (
        sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        if sort_by_length
        else list(range(len(prompts)))
    )
    gen = torch.Generator(device=device).manual_seed(seed)
    out: list[Sample | None] = [None] * len(prompts)
    st = stats if stats is not None else SampleStats()
    kw: dict[str, Any] = {"logits_to_keep": 1} if _accepts(hf, "logits_to_keep") else {}
    t0 = time.perf_counter()
    with torch.inference_mode(), _contiguous_head_input(hf):
        prefix = SharedPrefix(hf, prompts if share_prefix else [], **kw)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = [list(prompts[i]) for i in idx]
            use = prefix if prefix.fits(max(map(len, batch)) + max_new_tokens) else None
            for j, s in zip(
                idx,
                _sample_batch(
                    hf,
                    batch,
                    use,
                    max_new_tokens,
                    temperature,
                    top_p,
                    gen,
                    stop_ids,
                    allowed,
                    topk,
                    pad_id,
                    compact,
                    grammar,
                ),
                strict=False,
            ):
                out[j] = Sample(index=j, **s)
                st.new_tokens += len(s["token_ids"])
            st.prompt_tokens += sum(len(p) for p in batch)
            st.shared_tokens += len(use) * len(batch) if use is not None else 0
            if progress is not None:
                progress(len(idx))
    st.seconds += time.perf_counter() - t0
    return out  # type: ignore[return-value]


TOPK_FIELDS = (
    "topk_ids",
    "topk_logprobs",
    "topk_ids_unconstrained",
    "topk_logprobs_unconstrained",
)


def top_logprobs(
    logits: torch.Tensor, k: int, ids: torch.Tensor | None = None
) -> tuple[list[list[int]], list[list[float]]]:
    """Per row, the top-k (token ids, log-probs rounded to 5 decimals) of softmax(logits)
    at temperature 1. logits [b, n]: over the vocabulary, or over the token ids `ids` [n]
    (then -inf marks a token not allowed at that step: it is left out, so a row that allows
    fewer than k tokens has fewer entries)."""
    lp = logits.log_softmax(-1)
    v, i = lp.topk(min(k, lp.shape[-1]), dim=-1)  # [b, k]
    if ids is not None:
        i = ids[i]
    out_ids, out_lp = [], []
    for vr, ir in zip(v.tolist(), i.tolist(), strict=True):
        keep = [j for j, x in enumerate(vr) if x != float("-inf")]
        out_ids.append([ir[j] for j in keep])
        out_lp.append([round(vr[j], 5) for j in keep])
    return out_ids, out_lp


def _sample_batch(
    hf: nn.Module,
    batch: list[list[int]],
    prefix: SharedPrefix | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    gen: torch.Generator,
    stop_ids: Sequence[int],
    allowed: torch.Tensor | None,
    topk: int,
    pad_id: int,
    compact: bool,
    grammar: Any = None,
) -> list[dict]:
    device = next(hf.parameters()).device
    b = len(batch)
    skip = len(prefix) if prefix is not None else 0  # tokens in the shared prefix's cache
    # ids/pos [b, S]: the left-padded prompts after the prefix; attn [b, skip + S + new]
    ids, attn, pos = suffix_batch(batch, skip, pad_id, max_new_tokens, device)
    cache = prefix.cache_for(b) if prefix is not None else DynamicCache(config=hf.config)
    stop = torch.tensor(list(stop_ids), device=device)
    subset = allowed is not None and topk == 0
    kw: dict[str, Any] = {"use_cache": True}
    if _accepts(hf, "logits_to_keep"):
        kw["logits_to_keep"] = 1

    rows = torch.arange(b, device=device)  # original row of each live batch row
    tokens: list[list[int]] = [[] for _ in range(b)]
    tk: list[dict[str, list]] = [{k: [] for k in TOPK_FIELDS} for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    n_done_in_batch = 0
    cur = skip + ids.shape[1]
    inp, inp_pos = ids, pos
    with _restricted_head(hf, allowed if subset else None) as swapped:
        for step in range(max_new_tokens):
            with continuing_prompt(step == 0):  # the prefill: still the prompt after a prefix
                out = hf(
                    input_ids=inp,
                    attention_mask=attn[:, :cur],
                    position_ids=inp_pos,
                    past_key_values=cache,
                    **kw,
                )
            logits = out.logits[:, -1, :].float()  # [b_live, V] or [b_live, n_allowed]
            if topk > 0:
                full = top_logprobs(logits, topk)  # the full distribution's top-k
            if allowed is not None and not swapped:
                logits = logits[:, allowed]  # [b_live, n_allowed]
            if grammar is not None and allowed is not None:
                cand = allowed.tolist()
                ok = torch.tensor([grammar_mask(grammar, tokens[r], cand) for r in rows.tolist()])
                logits = logits.masked_fill(~ok.to(logits.device), float("-inf"))
            if topk > 0 and allowed is not None:  # the constrained distribution's top-k
                con = top_logprobs(logits, topk, ids=allowed)
            if temperature <= 0:
                nxt = logits.argmax(-1)  # [b_live]
            else:
                logits = logits / temperature
                if top_p < 1.0:
                    logits = _top_p_filter(logits, top_p)
                nxt = _draw(logits.softmax(-1), gen)
            if allowed is not None:
                nxt = allowed[nxt]  # subset index -> token id
            nxt_list = nxt.tolist()
            live = (~done).tolist()
            for r, (row, t) in enumerate(zip(rows.tolist(), nxt_list, strict=True)):
                if live[r]:
                    tokens[row].append(t)
                    if topk > 0 and allowed is None:
                        tk[row]["topk_ids"].append(full[0][r])
                        tk[row]["topk_logprobs"].append(full[1][r])
                    elif topk > 0:
                        tk[row]["topk_ids"].append(con[0][r])
                        tk[row]["topk_logprobs"].append(con[1][r])
                        tk[row]["topk_ids_unconstrained"].append(full[0][r])
                        tk[row]["topk_logprobs_unconstrained"].append(full[1][r])
            done |= torch.isin(nxt, stop)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            # drop finished rows once a quarter of the live batch is finished
            n_fin = int(done.sum())
            if compact and n_fin > n_done_in_batch and n_fin * 4 >= len(rows):
                keep = (~done).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows, attn, nxt, done = rows[keep], attn[keep], nxt[keep], done[keep]
                inp_pos = inp_pos[keep]
                n_done_in_batch = 0
            else:
                n_done_in_batch = n_fin
            attn[:, cur] = 1
            cur += 1
            inp = nxt.unsqueeze(-1)  # [b_live, 1]
            inp_pos = inp_pos[:, -1:] + 1  # [b_live, 1]
    stop_set = set(int(s) for s in stop_ids)
    return [
        {
            "token_ids": tokens[r],
            "stopped": bool(tokens[r]) and tokens[r][-1] in stop_set,
            **tk[r],
        }
        for r in range(b)
    ]
