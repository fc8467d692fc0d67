"""The cached scorers by partial forwards, for vectors at blocks.{L}.hook_resid_post.

A vector added at blocks.{L}.hook_resid_post (at every position) changes nothing in
blocks 0..L: their activations and KV caches are the unsteered ones. So the unsteered
model runs each cached pass of evals.scoring (shared prompt prefix, prompt remainders,
continuation rows) once, recording every block's output and call arguments (see
steerdiff.replay). A score at layer L then replays only blocks L+1.. from the recorded
resid_post of block L plus coeff x vector, with a replay KV cache that holds only those
blocks, and the unembedding runs only where a log-prob is read.

`FastScorer.logprobs` equals `candidate_logprobs` and `FastCoherence.kl` equals
`CoherenceProbe.kl` for such a vector (tests/test_sweep.py checks both).

Memory: the recordings hold every block's output for every prompt and continuation token
(n_layers x tokens x d_model). They live in a `budget.SpillCache`: within `budget` bytes
(default: $STEERDIFF_MEMORY_BUDGET, else 25% of RAM) in RAM, beyond it each recorded pass
is written to a temporary file and read back memory-mapped: a sweep reads every
recording once per (layer, strength) cell, so reading it back beats recomputing it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from ..budget import SpillCache, memory_budget_bytes
from ..hooks import final_norm, get_blocks
from ..models import LoadedModel
from ..replay import Prefix, ReplayCache, lm_head, record_forward, replay_blocks
from .scoring import (
    CoherenceProbe,
    answer_forms,
    common_prefix_len,
    continuation_feeds,
    left_pad_remainders,
)


class CachedPrompts:
    """Unsteered recordings of Q prompts (shared prefix once, then the remainders) and R
    continuation rows (row i continues prompt row_prompt[i]); replays blocks L+1.. for a
    vector added at blocks.{L}.hook_resid_post at every position.

    Matches prefix_forward / continue_forward of the full model (see the tests). budget:
    bytes of recordings kept in RAM (None: `budget.memory_budget_bytes()`); the rest is
    spilled to a memory-mapped temporary file, deleted with this object or by `close()`."""

    def __init__(
        self,
        lm: LoadedModel,
        prompts: Sequence[Sequence[int]],
        row_prompt: Sequence[int],
        row_tokens: Sequence[Sequence[int]],
        budget: int | None = None,
    ):
        model, dev = lm.model, lm.device
        self.store = SpillCache(memory_budget_bytes() if budget is None else budget, "recorded")
        self.model, self.norm = model, final_norm(model)
        self.n_layers = len(get_blocks(model))
        self.q = q = len(prompts)
        pad = lm.tokenizer.pad_token_id or 0
        p = common_prefix_len(prompts)

        def record(key: object, **kw) -> object:
            """Record one pass into the store; its key."""
            rec = record_forward(model, keep_outputs=True, use_cache=True, **kw)
            self.store.put(key, rec.state())
            return key

        with torch.inference_mode():
            # a cache that keeps every position (no sliding-window layers): the recorded
            # masks then fit the replay caches, which keep every position too
            cache = DynamicCache()
            self.first: object | None = None  # store keys of the recorded passes
            if p > 0:
                ids = torch.tensor([list(prompts[0][:p])], device=dev)
                self.first = record("first", input_ids=ids, past_key_values=cache, logits_to_keep=1)
                cache.batch_repeat_interleave(q)
            ids, rest_mask, pos = left_pad_remainders(prompts, p, pad)
            mask = torch.cat([torch.ones(q, p, dtype=torch.long), rest_mask], dim=1)
            self.second = record(
                "second",
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=pos.to(dev),
                past_key_values=cache,
                logits_to_keep=1,
            )
            # continuation rows grouped by length: one recorded pass per length, no padding
            self.third: list[tuple[torch.Tensor, object]] = []
            next_pos = torch.tensor([len(r) for r in prompts])
            lengths = sorted({len(t) for t in row_tokens})
            order = [i for n in lengths for i, t in enumerate(row_tokens) if len(t) == n]
            # flat[i, t]: where token t of row i lands in the concatenated output (-1: none)
            width = max(lengths, default=0)
            self.flat = torch.full((len(row_tokens), width), -1, dtype=torch.long)
            at = 0
            for i in order:
                n = len(row_tokens[i])
                self.flat[i, :n] = torch.arange(at, at + n)
                at += n
            base_cache = cache
            for n in lengths:
                rows = [i for i, t in enumerate(row_tokens) if len(t) == n]
                idx = torch.tensor([row_prompt[i] for i in rows], dtype=torch.long)
                ids = torch.tensor([list(row_tokens[i]) for i in rows], dtype=torch.long)
                pos = next_pos[idx].unsqueeze(1) + torch.arange(n)
                cache = copy.deepcopy(base_cache)
                cache.batch_select_indices(idx.to(dev))
                rec = record(
                    ("third", n),
                    input_ids=ids.to(dev),
                    attention_mask=torch.cat(
                        [mask[idx], torch.ones(len(rows), n, dtype=torch.long)], dim=1
                    ).to(dev),
                    position_ids=pos.to(dev),
                    past_key_values=cache,
                )
                self.third.append((idx, rec))

    def close(self) -> None:
        """Forget the recordings (and delete their spill folder)."""
        self.store.close()

    def _run(
        self, key: object, layer: int, add: torch.Tensor | None, kv: ReplayCache
    ) -> torch.Tensor:
        """Blocks layer+1.. from the recorded resid_post of `layer` (+ add) -> last resid_post."""
        rec = Prefix.from_state(self.store.get(key))
        h = rec.output(layer)
        if add is not None:
            h = h + add.to(dtype=h.dtype, device=h.device)
        return replay_blocks(self.model, rec, h, first=layer + 1, cache=kv)

    def replay(
        self, layer: int, vector: torch.Tensor | None = None, coeff: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final-normed hidden after blocks.{layer}.hook_resid_post += coeff * vector:
        (each prompt's last token [Q, d], every continuation token [N, d] or None; token t of
        row i is at self.flat[i, t])."""
        add = None if vector is None or coeff == 0.0 else coeff * vector
        with torch.inference_mode():
            kv = ReplayCache()
            if self.first is not None:
                self._run(self.first, layer, add, kv)
                kv = kv.rows(self.q)
            last = self.norm(self._run(self.second, layer, add, kv)[:, -1])
            cont = None
            if self.third:
                cont = torch.cat(
                    [
                        self._run(rec, layer, add, kv.rows(idx)).flatten(0, 1)
                        for idx, rec in self.third
                    ]
                )
                cont = self.norm(cont)
        return last, cont

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden [..., d] -> float logits [..., vocab]."""
        with torch.inference_mode():
            return lm_head(self.model, h).float()


class FastScorer:
    """The exact scorer (candidate_logprobs) for vectors at hook_resid_post, by partial
    forwards; the head runs only at the continuation tokens that score a candidate."""

    def __init__(
        self, lm: LoadedModel, prompts: Sequence[Sequence[int]], candidates: Sequence[str]
    ):
        owner, forms = answer_forms(lm.tokenizer, candidates)
        feeds, which = continuation_feeds(forms)
        q, n_f = len(prompts), len(feeds)
        self.cached = CachedPrompts(
            lm,
            prompts,
            [r for r in range(q) for _ in feeds],
            [fd for _ in range(q) for fd in feeds],
        )
        self.first_tok = torch.tensor([f[0] for f in forms])
        self.n_forms = len(forms)
        self.cols = [[fi for fi, o in enumerate(owner) if o == ci] for ci in range(len(candidates))]
        q_i, f_i, flat_i, tok_i = [], [], [], []
        if n_f:
            flat = self.cached.flat
            for qq in range(q):
                for fi, f in enumerate(forms):
                    if which[fi] < 0:
                        continue
                    r = qq * n_f + which[fi]
                    for t in range(len(f) - 1):
                        q_i.append(qq)
                        f_i.append(fi)
                        flat_i.append(int(flat[r, t]))
                        tok_i.append(f[t + 1])
        self.gather = tuple(torch.tensor(x, dtype=torch.long) for x in (q_i, f_i, flat_i, tok_i))

    def logprobs(
        self, layer: int, vector: torch.Tensor | None = None, coeff: float = 0.0
    ) -> torch.Tensor:
        """log P(candidate | prompt) under coeff x vector at blocks.{layer}.hook_resid_post
        -> [Q, n_candidates]."""
        last, cont = self.cached.replay(layer, vector, coeff)
        with torch.inference_mode():
            form_lp = torch.log_softmax(self.cached.head(last), -1)[:, self.first_tok]  # [Q, F]
            if cont is not None and len(self.gather[0]):
                q_i, f_i, flat_i, tok_i = self.gather
                lp = torch.log_softmax(self.cached.head(cont), -1)
                form_lp = form_lp.index_put((q_i, f_i), lp[flat_i, tok_i], accumulate=True)
            return torch.stack([torch.logsumexp(form_lp[:, c], dim=1) for c in self.cols], 1)


class FastCoherence:
    """CoherenceProbe.kl for vectors at hook_resid_post, by partial forwards."""

    def __init__(self, probe: CoherenceProbe):
        feeds = [r[:-1] for r in probe.responses]
        rows = list(range(len(feeds))) if feeds[0] else []
        self.cached = CachedPrompts(probe.lm, probe.prompts, rows, feeds if rows else [])
        self.base = self._logprobs(self.cached.n_layers - 1, None, 0.0)

    def _logprobs(self, layer: int, vector: torch.Tensor | None, coeff: float) -> torch.Tensor:
        last, cont = self.cached.replay(layer, vector, coeff)
        with torch.inference_mode():
            out = torch.log_softmax(self.cached.head(last), -1).unsqueeze(1)  # [K, 1, vocab]
            if cont is not None:
                rest = torch.log_softmax(self.cached.head(cont), -1)[self.cached.flat]
                out = torch.cat([out, rest], dim=1)
            return out

    def kl(self, layer: int, vector: torch.Tensor, coeff: float) -> float:
        """KL(unsteered || steered), mean over prompts and tokens."""
        steered = self._logprobs(layer, vector, coeff)
        with torch.inference_mode():
            return float((self.base.exp() * (self.base - steered)).sum(-1).mean())
