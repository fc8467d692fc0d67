"""Constrained decoding for the numbers task: which tokens may be sampled, and in what order.

`allowed_token_ids` is the token set (digits and separators only); `NumberListGrammar`
narrows it per row and step so every completion stays a list the task's filter accepts.
Both are passed to `generate.sample(allowed_ids=..., grammar=...)` by `numbers.make_dataset`.
"""

from __future__ import annotations

import re

from ..generate import DatasetError

ALLOWED_CHARS = set("0123456789 ,;\n")


def allowed_token_ids(tokenizer, max_len: int = 4) -> list[int]:
    """Token ids whose text is only digits and separators (space, ",", ";", newline),
    at most `max_len` characters. Special tokens are excluded (add the stop ids)."""
    special = set(tokenizer.all_special_ids or [])
    ids = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        t = tokenizer.decode([i])
        if t and len(t) <= max_len and set(t) <= ALLOWED_CHARS:
            ids.append(i)
    if not any(tokenizer.decode([i]).strip().isdigit() for i in ids):
        raise DatasetError(
            "This tokenizer has no pure-digit tokens; constrained decoding needs them "
            "(use --no-constrained)."
        )
    return ids


# ----------------------------------------------------------------------------- format grammar

SEPARATORS = (",", ", ", ";", "; ", " ", "\n")


class NumberListGrammar:
    """Per-row constraint: the completion stays a list the filter accepts.

    On top of the digits/separators token set: at most `max_digits` digits per number,
    one separator style (one of SEPARATORS) used throughout, at most `max_numbers`
    numbers, no leading separator, end-of-turn only right after a digit. Used by
    generate.sample(grammar=...): mask(tokens so far, candidate ids) -> allowed flags.
    """

    def __init__(self, tokenizer, stop_ids, max_numbers: int = 10, max_digits: int = 3) -> None:
        self.tokenizer = tokenizer
        self.stop = set(int(s) for s in stop_ids)
        self.max_numbers = max_numbers
        self.max_digits = max_digits
        self._text: dict[int, str] = {}

    def text(self, i: int) -> str:
        if i not in self._text:
            self._text[i] = "" if i in self.stop else self.tokenizer.decode([i])
        return self._text[i]

    def prefix_ok(self, s: str) -> bool:
        """Can `s` still grow into an accepted list?"""
        runs = re.split(r"(\d+)", s)  # ['', '12', ', ', '3', ''] : seps at even positions
        if runs[0]:
            return False  # starts with a separator
        numbers = runs[1::2]
        if len(numbers) > self.max_numbers or any(len(n) > self.max_digits for n in numbers):
            return False
        seps = runs[2::2]
        complete, tail = seps[:-1], seps[-1] if seps else ""
        first = complete[0] if complete else None
        if first is not None and (first not in SEPARATORS or any(x != first for x in complete)):
            return False
        if tail:
            if len(numbers) >= self.max_numbers:
                return False
            if first is not None:
                return first.startswith(tail)
            return any(sep.startswith(tail) for sep in SEPARATORS)
        return True

    def mask(self, tokens: list[int], candidates: list[int]) -> list[bool]:
        so_far = "".join(self.text(t) for t in tokens)
        ends_with_digit = so_far[-1:].isdigit()
        return [
            ends_with_digit if c in self.stop else self.prefix_ok(so_far + self.text(c))
            for c in candidates
        ]
