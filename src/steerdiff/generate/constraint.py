"""Decoding constraints: which tokens may be sampled at each step, as one recordable spec.

The numbers task decodes under a constraint (a token set: digits and separators only, and a
list grammar that narrows it per row and step). What the teacher "says" on such data is its
distribution renormalised over what the constraint allowed at each step, so whoever scores
the data (fit) must rebuild exactly the same per-step allowed sets. This module is that one
mechanism, below both writers (the sampler, tasks.numbers) and readers (fit.data):

* `allowed_token_ids(tokenizer)`  the token set (digits/separators, <= 4 characters);
* `NumberListGrammar`             the per-row list grammar (mask(tokens so far, candidates));
* `grammar_mask(...)`             the grammar's mask with the sampler's fallback;
* `DecodingConstraint`            the spec a manifest records (`constraint`), and
                                  `allowed_steps(completion_ids)`: the allowed ids per step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .reader import DatasetError

ALLOWED_CHARS = set("0123456789 ,;\n")
TOKEN_RULES = ("digits_separators",)  # the token-set rules a spec may name


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


def grammar_mask(grammar: Any, tokens: list[int], candidates: list[int]) -> list[bool]:
    """`grammar.mask(tokens, candidates)`, or every candidate when it allows none (the
    sampler then falls back to the token set rather than get stuck)."""
    ok = grammar.mask(tokens, candidates)
    return ok if any(ok) else [True] * len(candidates)


# ----------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class DecodingConstraint:
    """What a constrained dataset was decoded under, as its manifest records it.

    tokens: the token-set rule ("digits_separators": `allowed_token_ids`) and its
    max_token_chars; stop_ids: the end-of-turn ids the sampler added to the set;
    grammar: whether `NumberListGrammar(max_numbers, max_digits)` narrowed it per step.
    """

    tokens: str = "digits_separators"
    max_token_chars: int = 4
    stop_ids: tuple[int, ...] = ()
    grammar: bool = True
    max_numbers: int = 10
    max_digits: int = 3

    def spec(self) -> dict[str, Any]:
        """The manifest's `constraint` entry (JSON)."""
        return {**asdict(self), "stop_ids": list(self.stop_ids)}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], where: str = "the manifest") -> DecodingConstraint:
        """The constraint a manifest's `constraint` entry describes; DatasetError naming
        the field when it is not one this version can rebuild."""
        fields = set(cls.__dataclass_fields__)
        unknown = sorted(set(spec) - fields)
        if unknown:
            raise DatasetError(
                f"{where}: its 'constraint' has fields this steerdiff does not know "
                f"({', '.join(unknown)}); upgrade steerdiff, or fit with "
                "constrained_scoring=False (--no-constrained-scoring)."
            )
        if spec.get("tokens", "digits_separators") not in TOKEN_RULES:
            raise DatasetError(
                f"{where}: constraint.tokens is {spec.get('tokens')!r}, not one of "
                f"{', '.join(TOKEN_RULES)}; fit with constrained_scoring=False."
            )
        kw = dict(spec)
        kw["stop_ids"] = tuple(int(s) for s in kw.get("stop_ids", ()))
        return cls(**kw)

    def build(self, tokenizer) -> tuple[list[int], NumberListGrammar | None]:
        """(the token set without the stop ids, the grammar or None): sample()'s
        allowed_ids and grammar."""
        ids = allowed_token_ids(tokenizer, self.max_token_chars)
        rules = (
            NumberListGrammar(tokenizer, self.stop_ids, self.max_numbers, self.max_digits)
            if self.grammar
            else None
        )
        return ids, rules

    def stepper(self, tokenizer) -> ConstraintSteps:
        """What rebuilds the allowed ids at each step of completions (see ConstraintSteps)."""
        ids, rules = self.build(tokenizer)
        return ConstraintSteps(sorted(set(ids) | set(self.stop_ids)), rules)


@dataclass
class ConstraintSteps:
    """The allowed ids at each step of a completion, exactly as `generate.sample` allowed
    them: the token set plus stop ids, narrowed by the grammar (with its fallback)."""

    candidates: list[int]  # sorted: the token set and the stop ids
    grammar: NumberListGrammar | None

    def allowed_steps(self, completion_ids: Sequence[int]) -> list[list[int]]:
        """[len(completion_ids)] lists of allowed ids: step t given completion_ids[:t]."""
        out = []
        for t in range(len(completion_ids)):
            if self.grammar is None:
                out.append(self.candidates)
                continue
            ok = grammar_mask(self.grammar, list(completion_ids[:t]), self.candidates)
            out.append([c for c, keep in zip(self.candidates, ok, strict=True) if keep])
        return out
