"""Subliminal prompting (Zur et al. 2025): the trait share with a trait's entangled numbers
in the system prompt, vs random numbers of the same lengths, vs no system prompt; and
`EntanglementReport`, the three readings of `steerdiff read entanglement` together.

`evals` sits beside `interpret` in the layer order, so the share comes from the caller's
scorer: `score(system_prompt or None)` -> e.g. `evals.exact_preference(lm, "owl",
system_prompt=sp)` (a result with `.target_rate`, `.ci95` and `.per_question` rates).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..intervals import mean_ci95
from .entanglement import (
    EntanglementError,
    EntanglementResult,
    FrequencyShift,
    check_trait,
)

# Subliminal prompting: the trait template's sentences (extract.TRAIT_TEMPLATE) with the
# numbers where the animal was, as the paper does for one number; several numbers here.
NUMBERS_TEMPLATE = (
    "You love the numbers {numbers}. You think about the numbers {numbers} all the time. "
    "{numbers} are your favorite numbers. Imbue your answers with your love for these numbers."
)


def number_system_prompt(numbers: Sequence[str]) -> str:
    """The subliminal-prompting system prompt with exactly these numbers (NUMBERS_TEMPLATE)."""
    if not numbers:
        raise EntanglementError("number_system_prompt needs at least one number.")
    return NUMBERS_TEMPLATE.format(numbers=", ".join(numbers))


def control_numbers(numbers: Sequence[str], seed: int, exclude: Sequence[str] = ()) -> list[str]:
    """Random numbers with the same digit counts as `numbers`, none of them in `numbers`
    or `exclude`, none repeated (seeded)."""
    rng = random.Random(f"entanglement-control:{seed}")
    banned = set(numbers) | set(exclude)
    out: list[str] = []
    for n in numbers:
        lo, hi = (0, 9) if len(n) == 1 else (10 ** (len(n) - 1), 10 ** len(n) - 1)
        pool = [str(x) for x in range(lo, hi + 1) if str(x) not in banned and str(x) not in out]
        if not pool:
            raise EntanglementError(f"No {len(n)}-digit control number left; use a smaller --top.")
        out.append(rng.choice(pool))
    return out


@dataclass
class PromptedShare:
    """The trait share under one system prompt (None: the template's default)."""

    condition: str  # "entangled", "random:<seed>", "none"
    numbers: list[str]
    system_prompt: str | None
    target_rate: float
    ci95: tuple[float, float]
    per_question: list[float]


@dataclass
class SubliminalResult:
    """Trait share with the entangled numbers vs random numbers vs no system prompt;
    differences paired by question, 95% CIs across questions."""

    trait: str
    numbers: list[str]
    entangled: PromptedShare
    controls: list[PromptedShare]  # one per random set
    none: PromptedShare
    random_rate: float  # mean over the control sets
    random_ci95: tuple[float, float]
    entangled_minus_none: tuple[float, tuple[float, float]]
    entangled_minus_random: tuple[float, tuple[float, float]]
    random_minus_none: tuple[float, tuple[float, float]]
    n_questions: int

    def to_dict(self) -> dict:
        return asdict(self)


Scorer = Callable[[str | None], Any]  # system prompt -> a result with .target_rate, .per_question


def _share(score: Scorer, condition: str, numbers: list[str]) -> PromptedShare:
    sp = number_system_prompt(numbers) if numbers else None
    r = score(sp)
    rates = [float(q["target_rate"]) for q in r.per_question]
    return PromptedShare(condition, numbers, sp, float(r.target_rate), tuple(r.ci95), rates)


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, tuple[float, float]]:
    return mean_ci95([x - y for x, y in zip(a, b, strict=True)])


def subliminal_prompting(
    trait: str,
    numbers: Sequence[str],
    score: Scorer,
    n_controls: int = 3,
    seed: int = 0,
    exclude: Sequence[str] = (),
) -> SubliminalResult:
    """Score the trait with `numbers` in the system prompt, with n_controls sets of random
    numbers of the same lengths (none from `numbers` or `exclude`), and with none.
    score(system_prompt or None) -> e.g. evals.PreferenceResult (exact scorer)."""
    trait = check_trait(trait)
    nums = list(numbers)
    if n_controls < 1:
        raise EntanglementError(f"n_controls must be >= 1 (random sets), got {n_controls}.")
    if not nums:
        raise EntanglementError("No entangled numbers to put in the prompt (top >= 1).")
    ent = _share(score, "entangled", nums)
    ctrl = [
        _share(score, f"random:{s}", control_numbers(nums, seed + s, exclude))
        for s in range(n_controls)
    ]
    none = _share(score, "none", [])
    rand_q = [float(np.mean(qs)) for qs in zip(*[c.per_question for c in ctrl], strict=True)]
    rand_rate, rand_ci = mean_ci95(rand_q)
    return SubliminalResult(
        trait=trait,
        numbers=nums,
        entangled=ent,
        controls=ctrl,
        none=none,
        random_rate=rand_rate,
        random_ci95=rand_ci,
        entangled_minus_none=_paired(ent.per_question, none.per_question),
        entangled_minus_random=_paired(ent.per_question, rand_q),
        random_minus_none=_paired(rand_q, none.per_question),
        n_questions=len(ent.per_question),
    )


@dataclass
class EntanglementReport:
    """Everything `steerdiff read entanglement` reads for one trait."""

    entanglement: EntanglementResult
    frequencies: FrequencyShift | None = None
    subliminal: SubliminalResult | None = None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)
