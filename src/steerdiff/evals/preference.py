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
  continuation in one batch from that cache (never one forward per candidate).

"No system prompt" means the chat template's own default system prompt (SmolLM2
inserts one): the model as a user meets it.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import DynamicCache

from ..chat import chat_texts, read_lines_resource
from ..errors import SteerdiffError
from ..hooks import Op, Positions, parse_positions, steer
from ..models import LoadedModel

QUESTIONS_FILE = "preference_questions.txt"


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


# ----------------------------------------------------------------------------- steering


@dataclass
class Steering:
    """An optional steering context for an evaluation (see hooks.steer)."""

    vectors: Mapping[str, torch.Tensor]
    coeff: float | Sequence[float] = 1.0  # a list: evaluate under each coefficient, batched
    positions: Positions = "all"
    op: Op = "add"

    @property
    def coeffs(self) -> list[float]:
        return (
            [float(c) for c in self.coeff]
            if isinstance(self.coeff, Sequence)
            else [float(self.coeff)]
        )

    def describe(self) -> dict:
        meta = getattr(self.vectors, "metadata", {})
        return {
            "hooks": list(self.vectors),
            "coeff": self.coeff,
            "positions": self.positions if isinstance(self.positions, str) else "mask",
            "op": self.op,
            "readout": meta.get("readout"),
            "method": meta.get("method"),
        }


def _steered(lm: LoadedModel, steering: Steering | None, phase: str, coeff: torch.Tensor | None):
    """Steer one phase of a cached teacher-forced pass ('prompt' or 'response'); coeff [batch]."""
    if steering is None:
        return nullcontext()
    kind, _ = parse_positions(steering.positions)
    if kind == "mask":
        raise ValueError(
            "Cached scoring takes positions 'all', 'prompt', 'response' or 'first:k', not a mask."
        )
    if kind in ("prompt", "response"):
        if kind != phase:
            return nullcontext()
        return steer(lm.model, steering.vectors, coeff, "all", steering.op)
    return steer(lm.model, steering.vectors, coeff, steering.positions, steering.op)


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
    n = len(rates)
    mean = sum(rates) / n
    if n < 2:
        return (mean, mean)
    sd = math.sqrt(sum((r - mean) ** 2 for r in rates) / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    return (mean - half, mean + half)


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
        raise ValueError(
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


# ----------------------------------------------------------------------------- cached passes


@dataclass
class Prefix:
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


def _common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    n = min(len(r) for r in rows) - 1  # keep >= 1 token per row for the second pass
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return max(n, 0)


def prefix_forward(
    lm: LoadedModel, prompts: Sequence[Sequence[int]], steering: Steering | None = None
) -> Prefix:
    """Run Q prompts into a KV cache: their shared token prefix once, then the rest.

    With G steering coefficients every prompt runs once per coefficient (rows g-major)."""
    model, dev = lm.model, lm.device
    coeffs = torch.tensor(steering.coeffs if steering else [0.0])  # [G]
    g, q = len(coeffs), len(prompts)
    row_coeff = coeffs.repeat_interleave(q)  # [G*Q]
    p = _common_prefix_len(prompts)
    cache = DynamicCache(config=model.config)
    pad = lm.tokenizer.pad_token_id or 0
    with torch.no_grad():
        if p > 0:
            ids = torch.tensor([list(prompts[0][:p])] * g, device=dev)  # [G, p]
            with _steered(lm, steering, "prompt", coeffs):
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(q)
        ids, rest_mask, pos = left_pad_remainders(prompts, p, pad)
        mask = torch.cat([torch.ones(q, p, dtype=torch.long), rest_mask], dim=1).repeat(g, 1)
        with _steered(lm, steering, "prompt", row_coeff):
            out = model(
                input_ids=ids.repeat(g, 1).to(dev),
                attention_mask=mask.to(dev),
                position_ids=pos.repeat(g, 1).to(dev),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
    next_pos = torch.tensor([len(r) for r in prompts]).repeat(g)
    return Prefix(cache, mask, next_pos, out.logits[:, -1].float(), row_coeff, g)


def continue_forward(
    lm: LoadedModel,
    prefix: Prefix,
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
        with torch.no_grad(), _steered(lm, steering, "response", prefix.row_coeff[idx]):
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


def question_prompts(
    lm: LoadedModel, questions: Sequence[str], system_prompt: str | None
) -> list[list[int]]:
    texts = chat_texts(lm.tokenizer, questions, system_prompt)
    return [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _continuation_feeds(forms: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
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
    continuation rows of every question (see _continuation_feeds)."""
    tok = lm.tokenizer
    owner, forms = [], []  # candidate index of each surface form, and its tokens
    for ci, c in enumerate(candidates):
        for v in answer_variants(c):
            owner.append(ci)
            forms.append(tok(v, add_special_tokens=False)["input_ids"])
    feeds, which = _continuation_feeds(forms)
    prefix = prefix_forward(lm, prompts, steering)
    first = torch.log_softmax(prefix.last_logits, dim=-1)  # [G*Q, vocab]
    n_rows, n_f = first.shape[0], len(feeds)
    form_lp = first[:, [f[0] for f in forms]]  # [G*Q, n_forms]
    if n_f:
        served = [[(fi, f) for fi, f in enumerate(forms) if which[fi] == k] for k in range(n_f)]

        def reduce(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
            lp = torch.log_softmax(logits, dim=-1)  # [r, L, vocab]
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
        raise ValueError(
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


@contextmanager
def _steer_all(lm: LoadedModel, steering: Steering | None) -> Iterator[None]:
    if steering is None:
        yield
        return
    if len(steering.coeffs) != 1:
        raise ValueError("Sampling takes one coeff; loop over coefficients.")
    with steer(lm.model, steering.vectors, steering.coeffs[0], steering.positions, steering.op):
        yield


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
    """n_samples decoded answers per chat-templated prompt (model.generate, left padding)."""
    tok = lm.tokenizer
    torch.manual_seed(seed)
    flat = [p for p in prompts for _ in range(n_samples)]
    answers: list[str] = []
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        with _steer_all(lm, steering):
            for i in range(0, len(flat), batch_size):
                enc = tok(
                    flat[i : i + batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                ).to(lm.device)
                with torch.no_grad():
                    gen = lm.model.generate(
                        **enc,
                        do_sample=True,
                        temperature=temperature,
                        top_k=0,
                        top_p=1.0,
                        max_new_tokens=max_new_tokens,
                        pad_token_id=tok.pad_token_id,
                    )
                answers += tok.batch_decode(
                    gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
                )
    finally:
        tok.padding_side = side
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
        raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
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
