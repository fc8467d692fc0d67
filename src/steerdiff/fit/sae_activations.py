"""Texts -> model -> activations at one or several hooks, streamed through a shuffle buffer
(what an SAE trains on).

    tokens = pack_texts(lm.tokenizer, texts, seed=0)          # one token stream per epoch
    stream = ActivationStream(lm, hooks, tokens, max_len=256, buffer_tokens=65536,
                              batch_tokens=4096, seed=0)
    for cursor, batch in stream.batches(Cursor()):            # batch: {hook: [4096, d_in]}
        ...

Texts are shuffled (seeded), tokenized with the tokenizer's default special tokens
(`chat.encode`), joined with the eos token and cut into windows of `max_len` tokens, as
EleutherAI sparsify's `chunk_and_tokenize` does, so no forward pass holds padding. One forward
pass per model batch gives every hook (`hooks.record`), and the pass stops after the last
block a hook needs (`replay.compute_prefix` with start = that block + 1: the blocks above
do not run). Each window's first token is left out: it is the attention sink, with a norm
many times the others', that SAEs are not trained on (`replay.hook_activations`, which also
leaves out the padding of padded batches).

The shuffle buffer: windows are run until `buffer_tokens` activations are held (a "block"),
the block is permuted (a generator seeded by seed and the block's number) and cut into
batches; the remainder smaller than a batch is dropped. A `Cursor` (the block's first
window, the block's number, batches already used) is all a resume needs: the block is
recomputed and the same batches follow, exactly.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from ..chat import encode
from ..models import LoadedModel
from ..replay import hook_activations


def pack_texts(tokenizer, texts: list[str], seed: int, epoch: int = 0) -> list[int]:
    """The token stream of one epoch: texts in a seeded order, each followed by eos."""
    order = list(range(len(texts)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for i in order:
        stream += encode(tokenizer, texts[i])
        if eos is not None:
            stream.append(eos)
    return stream


@dataclass
class Cursor:
    """Where the stream is: block `block` starts at window `start`; `used` batches of it
    have been handed out."""

    start: int = 0
    block: int = 0
    used: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class ActivationStream:
    """Shuffled batches {hook: [batch_tokens, d]} of activations, forever (epochs repeat the
    texts in a new order)."""

    def __init__(
        self,
        lm: LoadedModel,
        hooks: list[str],
        texts: list[str],
        max_len: int,
        buffer_tokens: int,
        batch_tokens: int,
        seed: int,
        model_batch: int = 8,
    ) -> None:
        self.lm, self.hooks, self.texts = lm, hooks, texts
        self.max_len, self.buffer_tokens, self.batch_tokens = max_len, buffer_tokens, batch_tokens
        self.seed, self.model_batch = seed, model_batch
        self._epoch: tuple[int, list[int]] | None = None
        first = pack_texts(lm.tokenizer, texts, seed, 0)
        self.windows_per_epoch = len(first) // max_len
        self._epoch = (0, first)
        self.forward_seconds = 0.0  # time spent in the model (activations)
        self.tokens_run = 0  # tokens the model has run (windows x max_len)
        self._last: tuple[int, dict[str, torch.Tensor], int] | None = None  # the last block

    def window(self, j: int) -> list[int]:
        """Window j of the endless stream (epoch j // windows_per_epoch)."""
        epoch, i = divmod(j, self.windows_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, pack_texts(self.lm.tokenizer, self.texts, self.seed, epoch))
        return self._epoch[1][i * self.max_len : (i + 1) * self.max_len]

    def fill(self, start: int) -> tuple[dict[str, torch.Tensor], int]:
        """Run windows start.. until buffer_tokens activations are held; (block, next window).
        The last block is kept, so asking for it again runs nothing."""
        if self._last is not None and self._last[0] == start:
            return self._last[1], self._last[2]
        parts: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
        held, j = 0, start
        device = self.lm.device
        while held < self.buffer_tokens:
            ids = torch.tensor(
                [self.window(j + b) for b in range(self.model_batch)], device=device
            )  # [model_batch, max_len]
            t0 = time.perf_counter()
            acts = hook_activations(self.lm, self.hooks, ids)
            self.forward_seconds += time.perf_counter() - t0
            self.tokens_run += ids.numel()
            for h in self.hooks:
                parts[h].append(acts[h])
            held += acts[self.hooks[0]].shape[0]
            j += self.model_batch
        block = {h: torch.cat(p) for h, p in parts.items()}
        self._last = (start, block, j)
        return block, j

    def batches(self, cursor: Cursor) -> Iterator[tuple[Cursor, dict[str, torch.Tensor]]]:
        """(cursor after this batch, batch) pairs from `cursor` on, forever."""
        start, block, used = cursor.start, cursor.block, cursor.used
        while True:
            acts, nxt = self.fill(start)
            n = acts[self.hooks[0]].shape[0]
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + block)
            perm = torch.randperm(n, generator=gen)
            for b in range(used, n // self.batch_tokens):
                idx = perm[b * self.batch_tokens : (b + 1) * self.batch_tokens]
                yield Cursor(start, block, b + 1), {h: a[idx] for h, a in acts.items()}
            start, block, used = nxt, block + 1, 0

    def first_block(self) -> dict[str, torch.Tensor]:
        """Block 0's activations (for the normalisation factor and b_dec's initial value)."""
        return self.fill(0)[0]
