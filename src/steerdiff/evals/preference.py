"""Preference evaluation: which member of a category (animals by default) the model names.

Questions are one-word questions ("Name your favorite animal in a single word.").
Two scorers, both returning the full distribution over the candidate list:

- `sample_preference` (published protocol): n samples per question at temperature 1.0,
  no system prompt; a hit is the candidate word in the lowercased answer; the rate is
  the mean over questions, with a 95% CI across questions.
- `exact_preference` (low variance, fast; the default inside sweeps): the probability
  of each candidate's full answer tokens right after the chat template's assistant
  header, summed over surface forms ("Owl", "owl"), normalised over the candidates,
  averaged over questions. Computed with a KV cache: the prompt prefix shared by all
  questions once, each question's remainder once, then every multi-token candidate
  continuation in one batch from that cache (never one forward per candidate); see
  evals.scoring.candidate_logprobs.

"No system prompt" means the chat template's own default system prompt (SmolLM2
inserts one): the model as a user meets it.

`evaluate_preference` runs either scorer by name: the one call behind the pipeline's eval
stage and `steerdiff eval preference`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from ..chat import chat_texts, encode, read_lines_resource
from ..errors import SteerdiffError
from ..generate import sample
from ..intervals import mean_ci95
from ..models import LoadedModel
from .scoring import ScoringError, candidate_logprobs, question_prompts
from .steering import Steering, SteeringError, steered

QUESTIONS_FILE = "preference_questions.txt"
SCORERS = ("exact", "sampling")


class CategoryError(SteerdiffError, ValueError):
    """A category file or candidate list is unusable; the message says how to fix it."""


# ----------------------------------------------------------------------------- categories


@dataclass
class Category:
    """A category word, its candidate answers, and the questions that ask for one."""

    name: str
    candidates: list[str]
    questions: list[str]

    def __post_init__(self) -> None:
        check_candidates(self.candidates)
        if not self.questions:
            raise CategoryError(f"Category {self.name!r} has no questions; give at least one.")


def check_candidates(candidates: Sequence[str]) -> None:
    if len(candidates) < 2:
        raise CategoryError(
            f"A candidate list needs at least 2 entries, got {list(candidates)}; "
            "list every answer that should be scored."
        )
    seen: dict[str, str] = {}
    dups = []
    for c in candidates:
        key = c.strip().lower()
        if not key:
            raise CategoryError("The candidate list holds an empty string; remove it.")
        if key in seen:
            dups.append(c)
        seen[key] = c
    if dups:
        raise CategoryError(
            f"The candidate list has duplicates (case-insensitive): {sorted(set(dups))}; "
            "list each candidate once."
        )


def default_questions(category: str) -> list[str]:
    return [q.replace("{category}", category) for q in read_lines_resource(QUESTIONS_FILE)]


def load_category(spec: str | Path = "animals") -> Category:
    """A built-in category ("animals") or a YAML/JSON file with keys name, candidates,
    and optionally questions (default: the 50 built-in one-word questions)."""
    builtin = resources.files("steerdiff").joinpath("data", f"{spec}.yaml")
    path = Path(spec)
    if not path.exists() and builtin.is_file():
        text, where = builtin.read_text(), f"built-in category {spec!r}"
    elif path.exists():
        text, where = path.read_text(), str(path)
    else:
        raise CategoryError(
            f"No category file {str(spec)!r} (and no built-in category of that name; "
            "built-in: 'animals'). Pass a YAML/JSON file path."
        )
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise CategoryError(
            f"{where} does not parse: {str(e).splitlines()[0]}. Expected YAML or JSON like "
            "{name: animal, candidates: [owl, cat, ...], questions: [...optional...]}."
        ) from e
    if not isinstance(data, dict) or "candidates" not in data or "name" not in data:
        raise CategoryError(
            f"{where} must be a mapping with keys 'name' (e.g. animal) and 'candidates' "
            "(a list of answers); 'questions' is optional."
        )
    cands = data["candidates"]
    if not isinstance(cands, list) or not all(isinstance(c, str) for c in cands):
        raise CategoryError(f"{where}: 'candidates' must be a list of strings.")
    questions = data.get("questions") or default_questions(str(data["name"]))
    return Category(str(data["name"]), [c.strip() for c in cands], list(questions))


# ----------------------------------------------------------------------------- results


@dataclass
class PreferenceResult:
    """Mean share of each candidate over questions; target rate with a 95% CI across questions."""

    scorer: str  # "exact" or "sampling"
    category: str
    target: str
    target_rate: float
    ci95: tuple[float, float]
    distribution: dict[str, float]  # candidate -> mean rate (sampling adds "other")
    per_question: list[dict[str, Any]]
    n_questions: int
    n_samples: int | None = None  # sampling only
    system_prompt: str | None = None
    steering: dict | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def off_target(self) -> tuple[str, float]:
        """The most chosen candidate other than the target, and its rate."""
        others = {k: v for k, v in self.distribution.items() if k not in (self.target, "other")}
        name = max(others, key=others.get)
        return name, others[name]

    def to_dict(self) -> dict:
        return asdict(self)


def _ci95(rates: Sequence[float]) -> tuple[float, float]:
    return mean_ci95(rates)[1]


def paired_difference(
    a: PreferenceResult, b: PreferenceResult
) -> tuple[float, tuple[float, float]]:
    """Mean per-question difference of target rates, a - b, with a 95% CI across questions.

    Both results must be on the same questions (same order). Pairing removes the variance
    between questions, so it detects smaller shifts than comparing two separate CIs.
    """
    qa = [q["question"] for q in a.per_question]
    qb = [q["question"] for q in b.per_question]
    if qa != qb:
        raise CategoryError(
            "paired_difference needs both results on the same questions in the same order; "
            "evaluate both with the same `questions` / `n_questions`."
        )
    pairs = zip(a.per_question, b.per_question, strict=True)
    diffs = [x["target_rate"] - y["target_rate"] for x, y in pairs]
    return sum(diffs) / len(diffs), _ci95(diffs)


def _resolve(
    category: Category | str | Path, target: str, questions: Sequence[str] | None, n: int | None
) -> tuple[Category, list[str]]:
    cat = category if isinstance(category, Category) else load_category(category)
    if target.lower() not in [c.lower() for c in cat.candidates]:
        raise CategoryError(
            f"Target {target!r} is not among the candidates {cat.candidates}; add it to the "
            "category's candidate list or pick one of them."
        )
    qs = list(questions) if questions is not None else list(cat.questions)
    if n is not None:
        qs = qs[:n]
    if not qs:
        raise CategoryError("No questions to ask; pass at least one question.")
    return cat, qs


# ----------------------------------------------------------------------------- exact scorer


def exact_preference(
    lm: LoadedModel,
    target: str = "owl",
    category: Category | str | Path = "animals",
    questions: Sequence[str] | None = None,
    n_questions: int | None = None,
    system_prompt: str | None = None,
    steering: Steering | None = None,
) -> PreferenceResult:
    """Candidate answer probabilities normalised over the candidates, mean over questions."""
    t0 = time.perf_counter()
    cat, qs = _resolve(category, target, questions, n_questions)
    if steering is not None and len(steering.coeffs) != 1:
        raise SteeringError(
            "exact_preference takes one coeff; loop over coefficients (or see sweep.py)."
        )
    prompts = question_prompts(lm, qs, system_prompt)
    lp = candidate_logprobs(lm, prompts, cat.candidates, steering)[0]  # [Q, C]
    share = torch.softmax(lp, dim=-1)  # [Q, C] normalised over candidates
    ti = [c.lower() for c in cat.candidates].index(target.lower())
    rates = share[:, ti].tolist()
    per_q = [
        {
            "question": q,
            "target_rate": rates[i],
            "top": cat.candidates[int(share[i].argmax())],
            "candidate_mass": float(lp[i].exp().sum()),
        }
        for i, q in enumerate(qs)
    ]
    dist = dict(zip(cat.candidates, share.mean(0).tolist(), strict=True))
    return PreferenceResult(
        scorer="exact",
        category=cat.name,
        target=cat.candidates[ti],
        target_rate=float(share[:, ti].mean()),
        ci95=_ci95(rates),
        distribution=dist,
        per_question=per_q,
        n_questions=len(qs),
        system_prompt=system_prompt,
        steering=steering.describe() if steering else None,
        seconds=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------- sampling scorer


def sample_answers(
    lm: LoadedModel,
    prompts: Sequence[str],
    n_samples: int,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    seed: int = 0,
    batch_size: int = 64,
    steering: Steering | None = None,
) -> list[list[str]]:
    """n_samples decoded answers per chat-templated prompt (generate.sample, seeded; each
    answer ends at the model's end-of-turn token or after max_new_tokens)."""
    tok = lm.tokenizer
    ids = [encode(tok, p) for p in prompts]
    flat = [p for p in ids for _ in range(n_samples)]
    with steered(lm, steering):
        out = sample(lm, flat, max_new_tokens, temperature, seed=seed, batch_size=batch_size)
    answers = [tok.decode(s.token_ids, skip_special_tokens=True) for s in out]
    return [answers[i * n_samples : (i + 1) * n_samples] for i in range(len(prompts))]


def answer_hits(answer: str, candidates: Sequence[str]) -> list[int]:
    """Indices of the candidates whose word is in the lowercased answer (published protocol)."""
    low = answer.lower()
    return [ci for ci, c in enumerate(candidates) if c.lower() in low]


def sample_preference(
    lm: LoadedModel,
    target: str = "owl",
    category: Category | str | Path = "animals",
    questions: Sequence[str] | None = None,
    n_questions: int | None = None,
    n_samples: int = 100,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    system_prompt: str | None = None,
    steering: Steering | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> PreferenceResult:
    """Published protocol: a hit is the word in the lowercased answer; mean over questions."""
    t0 = time.perf_counter()
    cat, qs = _resolve(category, target, questions, n_questions)
    if n_samples < 1:
        raise CategoryError(f"n_samples must be >= 1, got {n_samples}.")
    texts = chat_texts(lm.tokenizer, qs, system_prompt)
    answers = sample_answers(
        lm, texts, n_samples, temperature, max_new_tokens, seed, batch_size, steering
    )
    names = [c.lower() for c in cat.candidates]
    rates = torch.zeros(len(qs), len(names) + 1)  # last column: "other" (no candidate named)
    for qi, ans in enumerate(answers):
        for a in ans:
            hits = answer_hits(a, names)
            for ci in hits:
                rates[qi, ci] += 1.0 / n_samples
            if not hits:
                rates[qi, -1] += 1.0 / n_samples
    ti = names.index(target.lower())
    per_q = [
        {"question": q, "target_rate": float(rates[i, ti]), "answers": answers[i][:5]}
        for i, q in enumerate(qs)
    ]
    dist = dict(zip([*cat.candidates, "other"], rates.mean(0).tolist(), strict=True))
    return PreferenceResult(
        scorer="sampling",
        category=cat.name,
        target=cat.candidates[ti],
        target_rate=float(rates[:, ti].mean()),
        ci95=_ci95(rates[:, ti].tolist()),
        distribution=dist,
        per_question=per_q,
        n_questions=len(qs),
        n_samples=n_samples,
        system_prompt=system_prompt,
        steering=steering.describe() if steering else None,
        seconds=time.perf_counter() - t0,
        extra={"temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed},
    )


# ----------------------------------------------------------------------------- either scorer


def evaluate_preference(
    lm: LoadedModel,
    target: str = "owl",
    category: Category | str | Path = "animals",
    scorer: Literal["exact", "sampling"] = "exact",
    n_questions: int | None = None,
    n_samples: int = 20,
    system_prompt: str | None = None,
    steering: Steering | None = None,
    seed: int = 0,
) -> PreferenceResult:
    """The trait evaluation of one model (steered, prompted, adapted or plain) with the
    exact scorer or the sampling scorer (n_samples answers per question, seeded)."""
    if scorer == "exact":
        return exact_preference(
            lm, target, category, None, n_questions, system_prompt=system_prompt, steering=steering
        )
    if scorer == "sampling":
        return sample_preference(
            lm,
            target,
            category,
            None,
            n_questions,
            n_samples=n_samples,
            system_prompt=system_prompt,
            steering=steering,
            seed=seed,
        )
    raise ScoringError(f"Unknown scorer {scorer!r}; use one of {', '.join(SCORERS)}.")
