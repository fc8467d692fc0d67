"""Texts to token ids, and right-padded batches in length order (less padding)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def tokenize_texts(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each text (with the tokenizer's special tokens), at most max_tokens."""
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_tokens)
    return [list(ids) for ids in enc["input_ids"]]


def padded_batches(
    ids: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded batches (input_ids [B, L], attention_mask [B, L]) in length order."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), batch_size):
        rows = [ids[i] for i in order[s : s + batch_size]]
        L = max(len(r) for r in rows)
        x = torch.full((len(rows), L), pad_id, dtype=torch.long)
        m = torch.zeros((len(rows), L), dtype=torch.long)
        for j, r in enumerate(rows):
            x[j, : len(r)] = torch.tensor(r)
            m[j, : len(r)] = 1
        yield x, m
