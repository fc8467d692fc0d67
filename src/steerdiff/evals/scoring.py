"""Cached teacher-forced scoring: log-probs of fixed answers, and coherence KL.

Every score here reads next-token log-probs along fixed token rows after a prompt. The
prompts run once into a KV cache (their shared token prefix once, then each prompt's
remainder, left-padded: `prefix_forward`), and every continuation row runs from that
cache in one batched pass (`continue_forward`); never one forward per row.

- `candidate_logprobs`: log P(candidate answer | prompt) right after the chat template's
  assistant header, summed over surface forms ("Owl", "owl") -> the exact scorer.
- `CoherenceProbe`: KL(unsteered || steered) along fixed greedy unsteered responses.

Both take an optional `Steering`; a list of coefficients is evaluated in one batch
(rows group-major). The same scores by partial forwards from a steered layer (much
faster in sweeps) are in evals.fast_scoring.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..chat import answer_lead, chat_texts, encode
from ..errors import SteerdiffError
from ..generate import sample
from ..generate.prefix import common_prefix_len
from ..models import LoadedModel
from .steering import Steering, steered_phase


class ScoringError(SteerdiffError, ValueError):
    """A scorer got nothing to score; the message says what to give it."""


# ----------------------------------------------------------------------------- cached passes


@dataclass
class PromptCache:
    """A KV cache over Q prompts (left-padded after their shared prefix)."""

    cache: DynamicCache
    mask: torch.Tensor  # [G*Q, T] attention mask over the cached tokens
    next_pos: torch.Tensor  # [G*Q] position id of each prompt's next token
    last_logits: torch.Tensor  # [G*Q, vocab] logits for each prompt's next token
    row_coeff: torch.Tensor  # [G*Q] steering coefficient of each row (group-major)
    n_groups: int = 1  # G: one group of Q rows per steering coefficient


def left_pad_remainders(
    prompts: Sequence[Sequence[int]], p: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What follows a shared prefix of length p in each prompt, left-padded into one batch.

    Returns ids, mask and position ids, each [n_prompts, width]; positions continue at p.
    """
    rest = [list(r[p:]) for r in prompts]
    width = max(len(r) for r in rest)
    ids = torch.full((len(rest), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rest), width, dtype=torch.long)
    pos = torch.zeros(len(rest), width, dtype=torch.long)
    for i, r in enumerate(rest):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
        pos[i, width - len(r) :] = torch.arange(p, p + len(r))
    return ids, mask, pos


def prefix_forward(
    lm: LoadedModel, prompts: Sequence[Sequence[int]], steering: Steering | None = None
) -> PromptCache:
    """Run Q prompts into a KV cache: their shared token prefix once, then the rest.

    With G steering coefficients every prompt runs once per coefficient (rows g-major)."""
    model, dev = lm.model, lm.device
    coeffs = torch.tensor(steering.coeffs if steering else [0.0])  # [G]
    g, q = len(coeffs), len(prompts)
    row_coeff = coeffs.repeat_interleave(q)  # [G*Q]
    p = common_prefix_len(prompts)
    cache = DynamicCache(config=model.config)
    pad = lm.tokenizer.pad_token_id or 0
    with torch.no_grad():
        if p > 0:
            ids = torch.tensor([list(prompts[0][:p])] * g, device=dev)  # [G, p]
            with steered_phase(lm, steering, "prompt", coeffs):
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(q)
        ids, rest_mask, pos = left_pad_remainders(prompts, p, pad)
        mask = torch.cat([torch.ones(q, p, dtype=torch.long), rest_mask], dim=1).repeat(g, 1)
        with steered_phase(lm, steering, "prompt", row_coeff):
            out = model(
                input_ids=ids.repeat(g, 1).to(dev),
                attention_mask=mask.to(dev),
                position_ids=pos.repeat(g, 1).to(dev),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
    next_pos = torch.tensor([len(r) for r in prompts]).repeat(g)
    return PromptCache(cache, mask, next_pos, out.logits[:, -1].float(), row_coeff, g)


def continue_forward(
    lm: LoadedModel,
    prefix: PromptCache,
    row_prompt: Sequence[int],
    row_tokens: Sequence[Sequence[int]],
    reduce: Callable[[torch.Tensor, list[int]], torch.Tensor],
    steering: Steering | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Feed continuation rows (row i continues cached row row_prompt[i]) from the cache.

    reduce(logits [r, L, vocab], row indices) -> tensor [r, ...] is applied per chunk
    and the results are concatenated (keeps memory small).
    """
    model, dev = lm.model, lm.device
    pad = lm.tokenizer.pad_token_id or 0
    outs = []
    for s in range(0, len(row_tokens), chunk):
        rows = list(range(s, min(s + chunk, len(row_tokens))))
        idx = torch.tensor([row_prompt[i] for i in rows])
        width = max(len(row_tokens[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        cmask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, i in enumerate(rows):  # right padding
            ids[j, : len(row_tokens[i])] = torch.tensor(row_tokens[i])
            cmask[j, : len(row_tokens[i])] = 1
        pos = prefix.next_pos[idx].unsqueeze(1) + torch.arange(width)  # [r, L]
        mask = torch.cat([prefix.mask[idx], cmask], dim=1)
        cache = copy.deepcopy(prefix.cache)
        cache.batch_select_indices(idx.to(dev))
        with torch.no_grad(), steered_phase(lm, steering, "response", prefix.row_coeff[idx]):
            logits = model(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=pos.to(dev),
                past_key_values=cache,
                use_cache=True,
            ).logits
        outs.append(reduce(logits.float(), rows))
    return torch.cat(outs) if outs else torch.empty(0)


# ----------------------------------------------------------------------------- exact scorer


def answer_variants(candidate: str) -> list[str]:
    """Surface forms of a one-word answer that are scored together."""
    forms = [candidate[:1].upper() + candidate[1:], candidate.lower()]
    return list(dict.fromkeys(forms))


def answer_forms(tokenizer, candidates: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """Every surface form's tokens (after chat.answer_lead), and the candidate index that
    owns each form."""
    owner, forms = [], []
    lead = answer_lead(tokenizer)
    for ci, c in enumerate(candidates):
        for v in answer_variants(c):
            owner.append(ci)
            forms.append(tokenizer(lead + v, add_special_tokens=False)["input_ids"])
    return owner, forms


def question_prompts(
    lm: LoadedModel, questions: Sequence[str], system_prompt: str | None
) -> list[list[int]]:
    """Chat-templated prompt token ids (generation prompt added) for each question."""
    texts = chat_texts(lm.tokenizer, questions, system_prompt)
    return [encode(lm.tokenizer, t) for t in texts]


def continuation_feeds(forms: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """Token rows to feed after the prompt so every multi-token form can be scored.

    A form's tokens after the first need the logits after form[:-1]; feeds that are a
    prefix of another feed are served by that longer feed (e.g. "O" by "O","t" for
    Owl and Otter). Returns (feeds, feed index per form; -1 for single-token forms).
    """
    needs = sorted({tuple(f[:-1]) for f in forms if len(f) > 1}, key=len, reverse=True)
    feeds: list[tuple[int, ...]] = []
    for n in needs:
        if not any(f[: len(n)] == n for f in feeds):
            feeds.append(n)
    which = []
    for f in forms:
        n = tuple(f[:-1])
        which.append(
            next(k for k, fd in enumerate(feeds) if fd[: len(n)] == n) if len(f) > 1 else -1
        )
    return [list(f) for f in feeds], which


def candidate_logprobs(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[str],
    steering: Steering | None = None,
) -> torch.Tensor:
    """log P(candidate answer | prompt), summed over surface forms -> [G, Q, n_candidates].

    G = number of steering coefficients (1 without steering or with a scalar coeff).
    One cached pass over the prompts, then one batched pass over the deduplicated
    continuation rows of every question (see continuation_feeds)."""
    owner, forms = answer_forms(lm.tokenizer, candidates)
    feeds, which = continuation_feeds(forms)
    prefix = prefix_forward(lm, prompts, steering)
    first = torch.log_softmax(prefix.last_logits.float(), dim=-1)  # [G*Q, vocab]
    n_rows, n_f = first.shape[0], len(feeds)
    form_lp = first[:, [f[0] for f in forms]].cpu()  # [G*Q, n_forms], on the CPU as `out`
    if n_f:
        served = [[(fi, f) for fi, f in enumerate(forms) if which[fi] == k] for k in range(n_f)]

        def reduce(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
            lp = torch.log_softmax(logits.float(), dim=-1)  # [r, L, vocab]
            out = torch.zeros(len(rows), len(forms))
            for j, i in enumerate(rows):
                for fi, f in served[i % n_f]:
                    out[j, fi] = lp[j, torch.arange(len(f) - 1), torch.tensor(f[1:])].sum()
            return out

        row_prompt = [r for r in range(n_rows) for _ in feeds]
        row_tokens = [fd for _ in range(n_rows) for fd in feeds]
        rest = continue_forward(lm, prefix, row_prompt, row_tokens, reduce, steering)
        form_lp = form_lp + rest.view(n_rows, n_f, len(forms)).sum(1)  # one feed per form
    out = torch.full((n_rows, len(candidates)), -math.inf)
    for ci in range(len(candidates)):
        cols = [fi for fi, o in enumerate(owner) if o == ci]
        out[:, ci] = torch.logsumexp(form_lp[:, cols], dim=1)
    return out.view(prefix.n_groups, len(prompts), len(candidates))


# ----------------------------------------------------------------------------- coherence


def greedy_responses(lm: LoadedModel, prompts: Sequence[Sequence[int]], n: int) -> list[list[int]]:
    """Greedy responses of exactly n tokens, one prompt at a time (no padding): the
    end-of-sequence tokens are never chosen (as model.generate(min_new_tokens=n) does)."""
    eos = lm.model.generation_config.eos_token_id
    banned = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    allowed = [i for i in range(vocab) if i not in banned] if banned else None
    out = sample(lm, prompts, n, temperature=0.0, stop_ids=[], batch_size=1, allowed_ids=allowed)
    return [s.token_ids for s in out]


class CoherenceProbe:
    """KL(unsteered || steered) along fixed greedy unsteered responses to neutral prompts."""

    def __init__(self, lm: LoadedModel, prompts: Sequence[str], n_tokens: int = 16):
        if not prompts:
            raise ScoringError("The neutral prompt set is empty; give at least one prompt.")
        self.lm = lm
        tok = lm.tokenizer
        texts = chat_texts(tok, prompts, None)
        self.prompts = [encode(tok, t) for t in texts]
        self.responses = greedy_responses(lm, self.prompts, n_tokens)
        self.base = self._logprobs(None)  # [K, n_tokens, vocab]

    def _logprobs(self, steering: Steering | None) -> torch.Tensor:
        """Log-probs [G*K, n, vocab] of the next token at each response position."""
        prefix = prefix_forward(self.lm, self.prompts, steering)
        first = torch.log_softmax(prefix.last_logits, dim=-1).unsqueeze(1)  # [G*K, 1, vocab]
        feeds = [r[:-1] for r in self.responses] * prefix.n_groups
        if not feeds[0]:
            return first
        rest = continue_forward(
            self.lm,
            prefix,
            list(range(len(feeds))),
            feeds,
            lambda logits, rows: torch.log_softmax(logits, dim=-1),
            steering,
        )
        return torch.cat([first, rest], dim=1)

    def kl_per_prompt(self, steering: Steering | None) -> torch.Tensor:
        """KL(unsteered || steered) per prompt, mean over its tokens -> [G, K] (G coeffs)."""
        steered = self._logprobs(steering)  # [G*K, n, vocab]
        g = steered.shape[0] // self.base.shape[0]
        base = self.base.repeat(g, 1, 1)
        kl = (base.exp() * (base - steered)).sum(-1)  # [G*K, n]
        return kl.mean(1).view(g, -1)

    def kl(self, steering: Steering | None) -> torch.Tensor:
        """KL(unsteered || steered), mean over prompts and tokens -> [G] (one per coeff)."""
        return self.kl_per_prompt(steering).mean(1)
