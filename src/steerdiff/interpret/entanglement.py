"""Token entanglement (Zur et al. 2025, "It's Owl in the Numbers").

Prompting a model with a trait raises the probability of particular numbers, and putting
those numbers in a system prompt raises the trait ("subliminal prompting"). Three readings:

- `token_entanglement`: for number prompts (tasks.numbers.make_prompts), the probability
  of every number 0-999 as the first number of the answer, under the trait's teacher (the
  prompt teacher: the trait system prompt of `extract.trait_system_prompt`; any
  `teachers.Teacher` works) vs the plain model; numbers ranked by the mean over prompts
  of log P_teacher(n) - log P_base(n), with a 95% CI across prompts.
- `frequency_shift`: how often those numbers occur in a teacher's dataset vs a base
  dataset (generate.load_dataset), with bootstrap CIs over rows.
- `subliminal_prompting` (interpret.subliminal): the trait share with the top-k numbers in
  a system prompt vs random numbers of the same lengths vs no system prompt.

Numbers are scored by their token sequence, exactly: SmolLM2 (like Qwen, Gemma, Llama 2)
writes every digit as its own token, so the single-token numbers are only 0-9; scoring
1-3 digit strings instead covers the 1,000 numbers the task allows. Per prompt, one
teacher-forced pass over the 100 rows prompt + [a, b] (a, b digits; the prompt runs once,
`generate.prefix.shared_prefix_hidden`) gives every needed distribution:
log P(n) = log P(a) + log P(b | a) + log P(c | a b) for 3-digit n, and for 1- and 2-digit
n the digits then the probability that a non-digit token follows (the number ends there).
A 3-digit number's end is not scored (the prompt asks for at most 3 digits; the task's
grammar forbids a fourth). Leading zeros ("07") are not numbers of the task.

The first answer position is where this reads the distribution: later positions depend
on which numbers were written before, and the first is where the paper reads it too (the
answer's first token). `evals` sits beside `interpret` in the layer order, so the trait
share comes from the caller's scorer, e.g.
`lambda sp: evals.exact_preference(lm, "owl", system_prompt=sp)`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import SteerdiffError
from ..generate import load_dataset
from ..intervals import mean_ci95
from ..progress import progress
from ..replay import lm_head
from ..teachers import Teacher, TeacherConfig, build_teacher

NUMBERS = [str(n) for n in range(1000)]  # index n <-> the number n, canonical spelling


class EntanglementError(SteerdiffError, ValueError):
    """Entanglement cannot be read from these inputs; the message says how to fix it."""


def check_trait(trait: str) -> str:
    """A trait is one word of letters (an animal: owl, cat); returns it lowercased."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z -]*", trait or ""):
        raise EntanglementError(
            f"Bad trait {trait!r}: give an animal name in letters, e.g. --trait owl."
        )
    return trait.strip().lower()


def digit_token_ids(tokenizer: Any) -> list[int]:
    """The token id of each digit 0-9; the tokenizer must write "123" as those 3 tokens."""
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in "0123456789"]
    split = tokenizer("1234567890", add_special_tokens=False)["input_ids"]
    if any(len(i) != 1 for i in ids) or split != [ids[int(d)][0] for d in "1234567890"]:
        raise EntanglementError(
            f"The tokenizer writes '1234567890' as {split}, not one token per digit: "
            "entanglement scoring needs a digit-splitting tokenizer (SmolLM2, Qwen2.5, "
            "Gemma, Llama 2); use one of those models (--model)."
        )
    return [i[0] for i in ids]


# ----------------------------------------------------------------------------- scoring


def _digit_logprobs(logits: torch.Tensor, digits: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V] -> (log P(digit) [..., 10], log P(any non-digit token) [...])."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    d = lp[..., digits]
    other = lp.clone()
    other[..., digits] = -math.inf
    return d, torch.logsumexp(other, dim=-1)


def prompt_number_logprobs(teacher: Teacher, user: str, digits: list[int]) -> torch.Tensor:
    """log P(the answer's first number is n) for n = 0..999 under `teacher` -> [1000]."""
    model, dev = teacher.lm.model, teacher.lm.device
    prompt = teacher.prompt_ids(user)
    p = len(prompt)
    pairs = [(a, b) for a in range(10) for b in range(10)]  # row a*10 + b
    ids = torch.tensor([prompt + [digits[a], digits[b]] for a, b in pairs], device=dev)
    attn = torch.ones_like(ids)
    cmask = torch.zeros_like(ids, dtype=torch.bool)
    cmask[:, p:] = True
    with torch.inference_mode(), teacher.scoring(cmask, attn) as m:
        hidden = teacher.hidden_states(m, ids, attn)[:, p - 1 :]  # [100, 3, d]
        d, end = _digit_logprobs(lm_head(model, hidden), digits)  # [100, 3, 10], [100, 3]
    lp1, end1 = d[0, 0], end[::10, 1]  # P(a); P(end | a) from rows a*10
    lp2, end2 = d[::10, 1], end[:, 2].view(10, 10)  # P(b | a) [10, 10]; P(end | a b)
    lp3 = d[:, 2].view(10, 10, 10)  # P(c | a b)
    out = torch.empty(1000)
    out[:10] = lp1 + end1
    two = lp1[:, None] + lp2 + end2  # [a, b]
    out[10:100] = two[1:].reshape(-1)
    three = lp1[:, None, None] + lp2[:, :, None] + lp3  # [a, b, c]
    out[100:] = three[1:].reshape(-1)
    return out


def number_logprobs(
    teacher: Teacher, users: Sequence[str], desc: str = "entanglement"
) -> torch.Tensor:
    """log P(first answer number = n | prompt) for every prompt -> [n_prompts, 1000]."""
    if not users:
        raise EntanglementError("No number prompts given; pass at least one (e.g. --prompts 64).")
    digits = digit_token_ids(teacher.lm.tokenizer)
    rows = []
    with progress(len(users), desc) as bar:
        for u in users:
            rows.append(prompt_number_logprobs(teacher, u, digits))
            bar.update(1)
    return torch.stack(rows)


# ----------------------------------------------------------------------------- ranking


@dataclass
class EntangledNumber:
    """One number's shift: mean over prompts of log P_teacher - log P_base, with its CI."""

    number: str
    log_ratio: float
    ci95: tuple[float, float]
    p_teacher: float  # mean over prompts of P(first number = n) under the teacher
    p_base: float


@dataclass
class EntanglementResult:
    """The top entangled numbers of a trait (ranked by mean log-ratio)."""

    trait: str
    teacher: dict
    n_prompts: int
    min_prob: float  # numbers with a mean teacher probability below this are not ranked
    top: list[EntangledNumber]
    n_ranked: int  # numbers that passed min_prob
    digit_mass_teacher: float  # mean P(the answer starts with a digit)
    digit_mass_base: float
    all_log_ratios: list[float] = field(default_factory=list)  # per number 0..999
    all_p_teacher: list[float] = field(default_factory=list)  # per number 0..999

    def numbers(self, k: int | None = None) -> list[str]:
        return [e.number for e in self.top[:k]]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def rank_entangled(
    teacher_lp: torch.Tensor,
    base_lp: torch.Tensor,
    top: int = 10,
    min_prob: float = 1e-4,
) -> tuple[list[EntangledNumber], int]:
    """Rank numbers by mean per-prompt log-ratio (teacher_lp, base_lp: [Q, 1000]); numbers
    whose mean teacher probability is below min_prob are left out (the far tail's ratios
    are large and meaningless). Returns (top numbers, how many were ranked)."""
    ratio = (teacher_lp - base_lp).double()  # [Q, 1000]
    p_t, p_b = teacher_lp.exp().mean(0), base_lp.exp().mean(0)
    keep = (p_t >= min_prob).nonzero().flatten().tolist()
    mean = ratio.mean(0)
    order = sorted(keep, key=lambda n: -float(mean[n]))
    out = []
    for n in order[:top]:
        m, ci = mean_ci95(ratio[:, n].tolist())
        out.append(EntangledNumber(NUMBERS[n], m, ci, float(p_t[n]), float(p_b[n])))
    return out, len(keep)


def trait_teacher(lm, trait: str, category: str = "animal") -> Teacher:
    """The prompt teacher of a trait: the trait system prompt (extract.trait_system_prompt)."""
    return build_teacher(
        TeacherConfig(kind="prompt", animal=check_trait(trait), category=category), lm
    )


def token_entanglement(
    lm,
    trait: str,
    users: Sequence[str],
    top: int = 10,
    min_prob: float = 1e-4,
    teacher: Teacher | None = None,
    base_lp: torch.Tensor | None = None,
) -> EntanglementResult:
    """The numbers whose probability the trait's teacher raises most, on number prompts
    `users` (e.g. tasks.numbers.make_prompts(64)). teacher: default the trait's prompt
    teacher; base_lp: the plain model's number_logprobs on the same prompts (pass it to
    reuse it across traits)."""
    trait = check_trait(trait)
    teacher = teacher or trait_teacher(lm, trait)
    if base_lp is None:
        base_lp = number_logprobs(build_teacher({"kind": "plain"}, lm), users, "base numbers")
    t_lp = number_logprobs(teacher, users, f"{trait} numbers")
    if base_lp.shape != t_lp.shape:
        raise EntanglementError(
            f"base_lp has shape {tuple(base_lp.shape)}, the prompts give {tuple(t_lp.shape)}: "
            "compute it with number_logprobs on the same prompts."
        )
    ranked, n_ranked = rank_entangled(t_lp, base_lp, top, min_prob)
    if not ranked:
        best = float(t_lp.exp().mean(0).max())
        raise EntanglementError(
            f"No number reaches min_prob {min_prob:g} under the {trait} teacher (the likeliest "
            f"has {best:.3g}): lower min_prob (--min-prob), e.g. to {best / 10:.1g}."
        )
    return EntanglementResult(
        trait=trait,
        teacher=teacher.spec(),
        n_prompts=len(users),
        min_prob=min_prob,
        top=ranked,
        n_ranked=n_ranked,
        digit_mass_teacher=float(t_lp.exp().sum(1).mean()),
        digit_mass_base=float(base_lp.exp().sum(1).mean()),
        all_log_ratios=(t_lp - base_lp).mean(0).tolist(),
        all_p_teacher=t_lp.exp().mean(0).tolist(),
    )


# ----------------------------------------------------------------------------- datasets


@dataclass
class NumberFrequency:
    """How often one number is written in the teacher's vs the base's dataset."""

    number: str
    teacher_count: int
    base_count: int
    teacher_rate: float  # count / all numbers written in that dataset
    base_rate: float
    log_ratio: float  # log((teacher_count + 0.5) / teacher_total) - same for base
    ci95: tuple[float, float]  # bootstrap over rows


@dataclass
class FrequencyShift:
    """The entangled numbers' frequencies in two datasets; `set_*` for all of them together."""

    teacher_data: str
    base_data: str
    teacher_rows: int
    base_rows: int
    teacher_numbers: int
    base_numbers: int
    numbers: list[NumberFrequency]
    set_teacher_rate: float
    set_base_rate: float
    set_difference: float  # teacher - base rate of the whole set
    set_difference_ci95: tuple[float, float]
    n_boot: int

    def to_dict(self) -> dict:
        return asdict(self)


def row_numbers(row: dict) -> list[str]:
    """The numbers (digit runs, as written) of a dataset row's answer."""
    msgs = row.get("messages") or []
    text = msgs[-1].get("content", "") if msgs and msgs[-1].get("role") == "assistant" else ""
    return re.findall(r"\d+", str(text))


def _count_matrix(rows: list[dict], numbers: Sequence[str]) -> np.ndarray:
    """[n_rows, k + 1]: each number's count per row, then all numbers in the row."""
    col = {n: i for i, n in enumerate(numbers)}
    out = np.zeros((len(rows), len(numbers) + 1))
    for r, row in enumerate(rows):
        found = row_numbers(row)
        for n in found:
            if n in col:
                out[r, col[n]] += 1
        out[r, -1] = len(found)
    return out


def _boot(counts: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap sums over rows: [n_boot, k + 1]."""
    n = len(counts)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)  # [n_boot, n_rows]
    return w @ counts


def frequency_shift(
    numbers: Sequence[str], teacher_data: str, base_data: str, n_boot: int = 1000, seed: int = 0
) -> FrequencyShift:
    """Frequencies of `numbers` in two datasets (read by generate.load_dataset)."""
    if not numbers:
        raise EntanglementError("No numbers to count; rank some first (top >= 1).")
    t_rows, _ = load_dataset(teacher_data)
    b_rows, _ = load_dataset(base_data)
    tc, bc = _count_matrix(t_rows, numbers), _count_matrix(b_rows, numbers)
    t_tot, b_tot = tc[:, -1].sum(), bc[:, -1].sum()
    for path, tot in ((teacher_data, t_tot), (base_data, b_tot)):
        if tot == 0:
            raise EntanglementError(
                f"{path} holds no numbers in its assistant answers; give a numbers dataset "
                "(steerdiff generate --task numbers)."
            )
    rng = np.random.default_rng(seed)
    tb, bb = _boot(tc, n_boot, rng), _boot(bc, n_boot, rng)  # [B, k + 1]
    per = []
    for i, n in enumerate(numbers):
        lr = math.log((tc[:, i].sum() + 0.5) / t_tot) - math.log((bc[:, i].sum() + 0.5) / b_tot)
        boot = np.log((tb[:, i] + 0.5) / tb[:, -1]) - np.log((bb[:, i] + 0.5) / bb[:, -1])
        lo, hi = np.percentile(boot, [2.5, 97.5])
        per.append(
            NumberFrequency(
                n,
                int(tc[:, i].sum()),
                int(bc[:, i].sum()),
                float(tc[:, i].sum() / t_tot),
                float(bc[:, i].sum() / b_tot),
                lr,
                (float(lo), float(hi)),
            )
        )
    k = len(numbers)
    st, sb = tc[:, :k].sum() / t_tot, bc[:, :k].sum() / b_tot
    diff = tb[:, :k].sum(1) / tb[:, -1] - bb[:, :k].sum(1) / bb[:, -1]
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return FrequencyShift(
        str(teacher_data),
        str(base_data),
        len(t_rows),
        len(b_rows),
        int(t_tot),
        int(b_tot),
        per,
        float(st),
        float(sb),
        float(st - sb),
        (float(lo), float(hi)),
        n_boot,
    )
