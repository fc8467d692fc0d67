"""Belief evaluation: does the model give a fact's false answer or its true one?

For every question of a facts file (evals.facts_file: the held-out "direct" phrasings and
the one-inference-step "generalisation" questions):

- exact: p_false = P(false answer) / (P(false answer) + P(true answer)), each answer's
  probability being that of ALL its tokens right after the question's chat prompt (the
  assistant header), summed over its surface forms ("Melbourne", "melbourne"): the
  preference scorer's cached-prefix machinery (evals.scoring.candidate_logprobs), run once
  per distinct answer pair. Mean per fact over its phrasings and per kind with a 95% CI
  across questions (intervals.mean_ci95).
- sampled (n_samples > 0): n_samples free-form answers per question (evals.preference's
  seeded sampler, temperature 1); each answer contains the false answer, the true one, or
  neither (case-insensitive whole-word match; an answer naming both counts for both and
  under "both"). Rates per question, then the same means and CIs.

`paired_beliefs(a, b)` gives a - b per question (same questions, same order) with CIs:
base vs finetune vs vectors side by side, paired per question.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..chat import chat_texts
from ..errors import SteerdiffError
from ..intervals import summary
from ..models import LoadedModel
from ..progress import progress as progress_bar
from .facts_file import BeliefQuestion, Fact
from .preference import sample_answers
from .scoring import answer_forms, candidate_logprobs, question_prompts
from .steering import Steering, SteeringError

KINDS = ("direct", "generalisation")
SAMPLE_CLASSES = ("false", "true", "both", "neither")


class BeliefsError(SteerdiffError, ValueError):
    """A belief evaluation that cannot run as asked; the message names the fact and the fix."""


@dataclass
class BeliefRecord:
    """One question's scores. sampled: rate per class (SAMPLE_CLASSES) when sampled."""

    fact_id: str
    kind: str
    question: str
    false_answer: str
    true_answer: str
    p_false: float
    logp_false: float  # log P(false answer | prompt), summed over surface forms
    logp_true: float
    sampled: dict[str, float] | None = None
    answers: list[str] = field(default_factory=list)  # the first few sampled answers


@dataclass
class BeliefResult:
    """Per-question records and their summaries (by kind, by fact and kind)."""

    records: list[BeliefRecord]
    n_samples: int = 0
    seed: int = 0
    steering: dict | None = None
    seconds: float = 0.0

    def kinds(self) -> list[str]:
        return [k for k in KINDS if any(r.kind == k for r in self.records)]

    def _select(self, kind: str, fact_id: str | None = None) -> list[BeliefRecord]:
        return [
            r for r in self.records if r.kind == kind and (fact_id is None or r.fact_id == fact_id)
        ]

    def summarise(self, kind: str, fact_id: str | None = None) -> dict[str, Any]:
        """{"p_false": summary, "sampled": {class: summary} or None} over the questions of
        this kind (and fact)."""
        sel = self._select(kind, fact_id)
        sampled = None
        if self.n_samples:
            sampled = {c: summary([r.sampled[c] for r in sel]) for c in SAMPLE_CLASSES}
        return {"p_false": summary([r.p_false for r in sel]), "sampled": sampled}

    def by_kind(self) -> dict[str, dict]:
        """{kind: summarise(kind)} across every fact's questions of that kind."""
        return {k: self.summarise(k) for k in self.kinds()}

    def by_fact(self) -> dict[str, dict[str, dict]]:
        """{fact_id: {kind: summarise(kind, fact_id)}}: a fact's mean over its phrasings."""
        facts = list(dict.fromkeys(r.fact_id for r in self.records))
        return {
            f: {k: self.summarise(k, f) for k in self.kinds() if self._select(k, f)} for f in facts
        }

    def to_dict(self) -> dict:
        return {
            "records": [asdict(r) for r in self.records],
            "by_kind": self.by_kind(),
            "by_fact": self.by_fact(),
            "n_samples": self.n_samples,
            "seed": self.seed,
            "steering": self.steering,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: dict) -> BeliefResult:
        """Back from to_dict() (e.g. a result.json); the summaries are recomputed."""
        try:
            records = [BeliefRecord(**r) for r in d["records"]]
        except (KeyError, TypeError) as e:
            raise BeliefsError(
                f"Not a belief result ({e}); pass a file written by `steerdiff eval beliefs --out`."
            ) from e
        return cls(records, d.get("n_samples", 0), d.get("seed", 0), d.get("steering"))


# ----------------------------------------------------------------------------- questions


def belief_questions(
    facts_or_questions: Sequence[Fact] | Sequence[BeliefQuestion], kinds: Sequence[str] = KINDS
) -> list[BeliefQuestion]:
    """The questions to ask: every fact's questions of these kinds, or the given questions
    (filtered to these kinds)."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise BeliefsError(f"Unknown question kind {bad or kinds}; use {', '.join(KINDS)}.")
    qs: list[BeliefQuestion] = []
    for item in facts_or_questions:
        if isinstance(item, Fact):
            qs += item.belief_questions(tuple(kinds))
        elif isinstance(item, BeliefQuestion):
            qs += [item] if item.kind in kinds else []
        else:
            raise BeliefsError(
                f"evaluate_beliefs takes Facts or BeliefQuestions, got {type(item).__name__}; "
                "load a facts file with evals.facts_file.load_facts."
            )
    if not qs:
        raise BeliefsError(
            f"No questions of kind {', '.join(kinds)} to ask; add some to the facts file "
            "(direct: 'questions'; generalisation: 'generalisation')."
        )
    return qs


def check_answer_tokens(lm: LoadedModel, q: BeliefQuestion) -> None:
    """The two answers must be told apart by their tokens: no surface form of one may
    tokenize as a form of the other, or as a prefix of it (P(prefix) counts the longer
    answer too)."""
    owner, forms = answer_forms(lm.tokenizer, [q.false_answer, q.true_answer])
    false_forms = [f for f, o in zip(forms, owner, strict=True) if o == 0]
    true_forms = [f for f, o in zip(forms, owner, strict=True) if o == 1]
    where = f"fact {q.fact_id!r} ({q.kind} question {q.question!r})"
    for a in false_forms:
        for b in true_forms:
            if a == b:
                raise BeliefsError(
                    f"{where}: the false answer {q.false_answer!r} and the true answer "
                    f"{q.true_answer!r} tokenize identically ({a}) under {lm.spec}'s tokenizer; "
                    "change one answer in the facts file so they differ in more than case or spacing."
                )
            short, long_ = (a, b) if len(a) < len(b) else (b, a)
            if long_[: len(short)] == short:
                raise BeliefsError(
                    f"{where}: the answers {q.false_answer!r} and {q.true_answer!r} are a token "
                    f"prefix of one another under {lm.spec}'s tokenizer, so P(shorter) includes "
                    "the longer; rephrase one answer in the facts file so neither starts with the other."
                )


# ----------------------------------------------------------------------------- scorers


def exact_beliefs(
    lm: LoadedModel,
    questions: Sequence[BeliefQuestion],
    steering: Steering | None = None,
    progress: bool = False,
) -> list[tuple[float, float]]:
    """(log P(false answer), log P(true answer)) per question: one cached pass per
    distinct (false, true) answer pair over all its questions."""
    for q in questions:
        check_answer_tokens(lm, q)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, q in enumerate(questions):
        groups.setdefault((q.false_answer, q.true_answer), []).append(i)
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(questions)
    with progress_bar(len(questions), "beliefs: exact", disable=not progress) as bar:
        for (false, true), idx in groups.items():
            prompts = question_prompts(lm, [questions[i].question for i in idx], None)
            lp = candidate_logprobs(lm, prompts, [false, true], steering)[0]  # [Q, 2]
            for j, i in enumerate(idx):
                out[i] = (float(lp[j, 0]), float(lp[j, 1]))
            bar.update(len(idx))
    return out


def mentions(answer: str, word: str) -> bool:
    """Whether `word` appears in `answer` as a whole word (case-insensitive)."""
    return re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", answer.lower()) is not None


def classify(answer: str, q: BeliefQuestion) -> str:
    """'false', 'true', 'both' or 'neither': which of the question's answers it names."""
    f, t = mentions(answer, q.false_answer), mentions(answer, q.true_answer)
    return "both" if f and t else "false" if f else "true" if t else "neither"


def sampled_rates(answers: Sequence[str], q: BeliefQuestion) -> dict[str, float]:
    """Rates over the answers: 'false' and 'true' count answers naming that answer (an answer
    naming both counts for both, and under 'both'); 'neither' names none."""
    cls = [classify(a, q) for a in answers]
    n = len(cls)
    return {
        "false": sum(c in ("false", "both") for c in cls) / n,
        "true": sum(c in ("true", "both") for c in cls) / n,
        "both": cls.count("both") / n,
        "neither": cls.count("neither") / n,
    }


def evaluate_beliefs(
    lm: LoadedModel,
    facts_or_questions: Sequence[Fact] | Sequence[BeliefQuestion],
    steering: Steering | None = None,
    n_samples: int = 0,
    seed: int = 0,
    progress: bool = False,
    kinds: Sequence[str] = KINDS,
    max_new_tokens: int = 24,
) -> BeliefResult:
    """p_false per question (exact), and with n_samples > 0 the sampled answer check.

    The model may be plain, an adapter / full finetune (teachers.load_adapted) or steered
    (steering, one coefficient). No system prompt of ours: the template's own applies."""
    t0 = time.perf_counter()
    if steering is not None and len(steering.coeffs) != 1:
        raise SteeringError("evaluate_beliefs takes one coeff; loop over coefficients.")
    if n_samples < 0:
        raise BeliefsError(f"n_samples must be >= 0 (0 = no sampling), got {n_samples}.")
    qs = belief_questions(facts_or_questions, kinds)
    lps = exact_beliefs(lm, qs, steering, progress)
    records = []
    for q, (lf, lt) in zip(qs, lps, strict=True):
        p_false = float(torch.softmax(torch.tensor([lf, lt]), 0)[0])
        records.append(
            BeliefRecord(
                q.fact_id, q.kind, q.question, q.false_answer, q.true_answer, p_false, lf, lt
            )
        )
    if n_samples:
        texts = chat_texts(lm.tokenizer, [q.question for q in qs], None)
        step = max(1, 256 // n_samples)  # questions per sampling call (~256 rows)
        with progress_bar(len(qs), "beliefs: sampling", disable=not progress) as bar:
            for s in range(0, len(qs), step):
                batch = sample_answers(
                    lm,
                    texts[s : s + step],
                    n_samples,
                    1.0,
                    max_new_tokens,
                    seed + s,
                    steering=steering,
                )
                for i, answers in enumerate(batch, start=s):
                    records[i].sampled = sampled_rates(answers, qs[i])
                    records[i].answers = answers[:5]
                bar.update(len(batch))
    return BeliefResult(
        records,
        n_samples,
        seed,
        steering.describe() if steering else None,
        time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------- paired


def paired_beliefs(a: BeliefResult, b: BeliefResult) -> dict[str, dict]:
    """a - b per question, summarised per kind: {kind: {"p_false": summary of the
    differences, "sampled_false": the same for the sampled false rate (when both sampled)}}.

    Both results must hold the same questions in the same order (evaluate both on the same
    facts and kinds). Pairing removes the spread between questions."""
    key = [(r.fact_id, r.kind, r.question) for r in a.records]
    if key != [(r.fact_id, r.kind, r.question) for r in b.records]:
        raise BeliefsError(
            "paired_beliefs needs both results on the same questions in the same order; "
            "evaluate both with the same facts file and --kinds."
        )
    out: dict[str, dict] = {}
    for kind in a.kinds():
        pairs = [(x, y) for x, y in zip(a.records, b.records, strict=True) if x.kind == kind]
        out[kind] = {"p_false": summary([x.p_false - y.p_false for x, y in pairs])}
        if a.n_samples and b.n_samples:
            diffs = [x.sampled["false"] - y.sampled["false"] for x, y in pairs]
            out[kind]["sampled_false"] = summary(diffs)
    return out
