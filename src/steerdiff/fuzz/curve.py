"""Fuzzing curves: an eval vs noise scale for one model variant, and which of two is more
readily pushed into the behaviour.

    ev = make_eval(lm, "preference", target="owl", n_questions=20)
    a = fuzz_curve(lm, base, hooks, [0, 0.25, 0.5, 1], ev, seeds=(0, 1))
    b = fuzz_curve(lm, teacher, hooks, [0, 0.25, 0.5, 1], ev, seeds=(0, 1))
    compare(a, b)["verdict"]              # "A", "B" or "no difference within the 95% CI"

Each question is scored on its own under its own noise draw (seed s, question i -> noise
seed s * 100003 + i): the cached scorers share a prompt prefix between the questions of one
call, so scoring them together would give every question the same noise on that prefix. The
same (seed, question) draws the same z for both models (common random numbers: the paired
difference carries less noise). Scale 0 is scored once, without noise hooks, and stands for
every seed.

Evals ("preference": the target's share, evals.preference.exact_preference; "misalignment":
P(misaligned), evals.misalignment.evaluate_misalignment_mc) give one value per question.
A curve's CI at a scale is across questions of the per-question mean over seeds (questions
are the independent units; seeds are nested in them).

compare(a, b): per question, the eval averaged over the scales > 0 ("level under noise"),
A - B, with a bootstrap 95% CI over questions -> the verdict; and the same for the rise above
each model's own scale-0 value (evidence, not the verdict: a model far below the eval's
noise floor rises toward it whatever it was trained on).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from ..interpret.variants import ModelContext
from ..intervals import bootstrap_ci, mean_ci95
from ..models import LoadedModel, unwrap
from ..progress import progress as progress_bar
from ..whiten import Gaussian
from .noise import FuzzError, noise

EVALS = ("preference", "misalignment")
NO_DIFFERENCE = "no difference within the 95% CI"


def check_eval(name: str) -> str:
    if name not in EVALS:
        raise FuzzError(
            f"Unknown eval {name!r}; the known evals are {', '.join(EVALS)} (e.g. --eval "
            "preference --target owl)."
        )
    return name


@dataclass
class FuzzEval:
    """An eval scored one question at a time: score(lm, i) -> question i's value."""

    name: str
    items: list[str]
    score: Callable[[LoadedModel, int], float]
    info: dict[str, Any]


def spread(n_total: int, n: int | None) -> list[int]:
    """n indices spread evenly over range(n_total) (every domain of a bank gets some)."""
    if n is None or n >= n_total:
        return list(range(n_total))
    return sorted({int(i) for i in np.linspace(0, n_total - 1, n).round()})


def make_eval(
    name: str,
    target: str = "owl",
    category: str = "animals",
    n_questions: int | None = None,
    questions: str | None = None,
) -> FuzzEval:
    """The named eval on n_questions questions (default: all of them)."""
    check_eval(name)
    if n_questions is not None and n_questions < 2:
        raise FuzzError(f"n_questions must be >= 2 (got {n_questions}): the CIs are over them.")
    if name == "preference":
        from ..evals.preference import exact_preference, load_category

        cat = load_category(category)
        qs = [cat.questions[i] for i in spread(len(cat.questions), n_questions)]
        if target.lower() not in [c.lower() for c in cat.candidates]:
            raise FuzzError(
                f"--target {target!r} is not among the {cat.name} candidates; pick one of "
                f"{', '.join(cat.candidates[:8])}, ..."
            )

        def pref(lm: LoadedModel, i: int) -> float:
            return exact_preference(lm, target, cat, questions=[qs[i]]).target_rate

        info = {"target": target, "category": cat.name, "scorer": "exact"}
        return FuzzEval(name, qs, pref, info)
    from ..evals.misalignment import evaluate_misalignment_mc
    from ..evals.misalignment_bank import load_questions

    bank = load_questions(questions)
    mcq = [bank[i] for i in spread(len(bank), n_questions)]

    def mis(lm: LoadedModel, i: int) -> float:
        return evaluate_misalignment_mc(lm, [mcq[i]]).records[0].p_misaligned

    info = {"questions": questions or "misalignment_mc", "ids": [q.id for q in mcq]}
    return FuzzEval(name, [q.question for q in mcq], mis, info)


@dataclass
class FuzzCurve:
    """values[k][s][i]: the eval on question i at scales[k] under noise seed seeds[s]."""

    label: str
    eval: str
    scales: list[float]
    seeds: list[int]
    items: list[str]
    values: list[list[list[float]]]
    hooks: list[str]
    noise: str  # "isotropic" or "whitened"

    def per_item(self, k: int) -> np.ndarray:
        """[n_items]: the mean over seeds at scales[k]."""
        return np.asarray(self.values[k], dtype=np.float64).mean(0)

    def points(self) -> list[dict[str, Any]]:
        """Per scale: mean over questions with its 95% CI (of the per-question seed means)."""
        out = []
        for k, s in enumerate(self.scales):
            mean, ci = mean_ci95(self.per_item(k).tolist())
            out.append({"scale": s, "mean": mean, "ci95": list(ci), "n": len(self.items)})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "points": self.points()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FuzzCurve:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def noise_seed(seed: int, item: int) -> int:
    return seed * 100003 + item


def _eval_lm(lm: LoadedModel, model: Any) -> LoadedModel:
    """The LoadedModel to score inside a variant: lm itself when the variant changes lm's
    own modules (vectors, a PEFT adapter), else lm with the variant's model (a full finetune)."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    if unwrap(model) is unwrap(lm) or inner is unwrap(lm):
        return lm
    return replace(lm, model=unwrap(model))


Point = Callable[[float, int, list[float]], None]


def fuzz_curve(
    lm: LoadedModel,
    variant: ModelContext,
    hooks: Sequence[str],
    scales: Sequence[float],
    eval: FuzzEval,
    seeds: Sequence[int] = (0, 1, 2),
    gaussians: Mapping[str, Gaussian] | None = None,
    label: str = "",
    done: Mapping[tuple[float, int], list[float]] | None = None,
    on_point: Point | None = None,
    progress: bool = False,
) -> FuzzCurve:
    """The eval at every (scale, seed) for one variant (entered once, for the whole curve).

    done: values already computed per (scale, seed) (a resumed run); on_point(scale, seed,
    values) is called after each new one (to save it)."""
    if not scales or not seeds:
        raise FuzzError("Give at least one scale and one seed (e.g. scales 0,0.5,1; seeds 3).")
    for s in scales:
        if not np.isfinite(s) or s < 0:
            raise FuzzError(f"scale must be a finite number >= 0 (got {s}); 0 means no noise.")
    done = dict(done or {})
    n = len(eval.items)
    todo = [(s, sd) for s in scales for sd in ([seeds[0]] if s == 0 else seeds)]
    left = sum(n for key in todo if key not in done)
    values: dict[tuple[float, int], list[float]] = {}
    with variant() as model, progress_bar(left, f"fuzz {label}", disable=not progress) as bar:
        elm = _eval_lm(lm, model)
        for s, sd in todo:
            if (s, sd) in done:
                values[(s, sd)] = list(done[(s, sd)])
                continue
            row = []
            for i in range(n):
                fuzz = (
                    nullcontext()
                    if s == 0
                    else noise(elm, hooks, s, noise_seed(sd, i), gaussians=gaussians)
                )
                with fuzz:
                    row.append(float(eval.score(elm, i)))
                bar.update(1)
            values[(s, sd)] = row
            if on_point is not None:
                on_point(s, sd, row)
    grid = [[values[(s, seeds[0] if s == 0 else sd)] for sd in seeds] for s in scales]
    kind = "isotropic" if gaussians is None else "whitened"
    return FuzzCurve(
        label, eval.name, list(scales), list(seeds), eval.items, grid, list(hooks), kind
    )


def _estimate(diffs: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Mean of per-question differences with a bootstrap 95% CI over questions."""
    ci, _ = bootstrap_ci(np.mean, diffs, seed=seed, error=FuzzError)
    return {"mean": float(diffs.mean()), "ci95": list(ci), "n": int(diffs.size)}


def verdict(est: Mapping[str, Any]) -> str:
    lo, hi = est["ci95"]
    return "A" if lo > 0 else "B" if hi < 0 else NO_DIFFERENCE


def compare(a: FuzzCurve, b: FuzzCurve) -> dict[str, Any]:
    """Which of A and B is more readily pushed into the behaviour, with the evidence (per
    question, paired; bootstrap 95% CIs over questions):

    level: A - B of the eval averaged over the scales > 0 -> "verdict";
    rise: A - B of (that average - the model's own scale-0 value) -> "rise_verdict";
    at_zero: A - B at scale 0 (no noise), when 0 is among the scales."""
    if (a.eval, a.scales, a.seeds, a.items) != (b.eval, b.scales, b.seeds, b.items):
        raise FuzzError(
            "compare needs two curves of one eval on the same scales, seeds and questions; "
            "make both with the same settings."
        )
    noisy = [k for k, s in enumerate(a.scales) if s > 0]
    if not noisy:
        raise FuzzError("compare needs at least one scale > 0 (e.g. scales 0,0.5,1).")
    if len(a.items) < 2:
        raise FuzzError("compare needs at least 2 questions: the CIs are over questions.")
    la = np.mean([a.per_item(k) for k in noisy], axis=0)
    lb = np.mean([b.per_item(k) for k in noisy], axis=0)
    out: dict[str, Any] = {"a": a.label, "b": b.label, "eval": a.eval}
    out["level"] = _estimate(la - lb)
    out["verdict"] = verdict(out["level"])
    if 0 in a.scales:
        z = a.scales.index(0)
        out["at_zero"] = _estimate(a.per_item(z) - b.per_item(z))
        out["rise"] = _estimate((la - a.per_item(z)) - (lb - b.per_item(z)))
        out["rise_verdict"] = verdict(out["rise"])
    out["sentence"] = sentence(out)
    return out


def sentence(c: Mapping[str, Any]) -> str:
    """The verdict line `steerdiff fuzz` prints."""
    lv = c["level"]
    ev = f"{c['eval']} under noise, A - B = {lv['mean']:+.4f} [{lv['ci95'][0]:+.4f}, "
    ev += f"{lv['ci95'][1]:+.4f}]"
    if c["verdict"] == NO_DIFFERENCE:
        return f"verdict: {NO_DIFFERENCE} ({ev}; A = {c['a']}, B = {c['b']})"
    name = c["a"] if c["verdict"] == "A" else c["b"]
    return f"verdict: {c['verdict']} ({name}) is more readily pushed into {c['eval']} ({ev})"
