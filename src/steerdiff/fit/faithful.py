"""The task-level half of faithfulness (interpret.faithfulness has the corpus half):

    heldout_losses(lm, data, finetuned=..., vectors=...)        -> dict
        CE per completion token of base, finetune and vectors on held-out task rows, and
        the gap the vectors close relative to the finetune, as `fit` reports it:
        (CE_base - CE_vectors) / (CE_base - CE_finetune), bootstrap interval over rows.
    task_eval_side_by_side(lm, finetuned=..., vectors=..., task="numbers", ...) -> dict
        the task's own evaluation of base, finetune and vectors, and the paired
        per-question differences (finetune - vectors, vectors - base, finetune - base).

Both fill the optional slots of interpret.FaithfulnessResult (`heldout`, `task_eval`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

import torch

from ..evals.steering import Steering
from ..hooks import steer
from ..interpret.variants import resolve_finetune
from ..models import LoadedModel, unwrap
from ..teachers import load_adapted
from .config import FitError
from .data import Example, pad_id_of, prepare_examples
from .losses import eval_losses, gap_figures, gap_within_noise

Evaluate = Callable[[LoadedModel, Steering | None], Any]
Paired = Callable[[Any, Any], Any]
TASKS = ("numbers", "facts", "none")


@torch.no_grad()
def heldout_losses(
    lm: LoadedModel,
    data: str | os.PathLike | Sequence[dict] | Sequence[Example],
    *,
    finetuned: Any,
    vectors: Mapping[str, torch.Tensor],
    coeff: float = 1.0,
    batch_size: int = 16,
    max_len: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean CE per completion token of the base, the finetune (adapter folder, model folder,
    LoadedModel, FinetuneResult) and base + vectors (all positions, as `fit` trains them)
    on held-out rows (any data `fit` reads; scored under the data's constraint when its
    manifest records one, as `fit` scores validation rows), and the gap closed:
    (CE_base - CE_vectors) / (CE_base - CE_finetune), with a 95% bootstrap interval over
    rows (fit.losses.gap_figures: the finetune plays the teacher's part)."""
    prepared = prepare_examples(lm, data, max_len=max_len)
    exs, pad = prepared.examples, pad_id_of(lm)
    hf = unwrap(lm)

    def desc(name: str) -> str | None:
        return f"held-out CE ({name})" if progress else None

    base = eval_losses(hf, exs, batch_size, pad, desc=desc("base"))
    with steer(hf, vectors, coeff):
        vec = eval_losses(hf, exs, batch_size, pad, desc=desc("vectors"))
    with resolve_finetune(lm, finetuned).context() as ft_model:
        ft = eval_losses(ft_model, exs, batch_size, pad, desc=desc("finetune"))
    figures = gap_figures(base, vec, ft, intervals=True)
    return {
        "data": prepared.source,
        "n_rows": len(exs),
        "n_tokens": base["n_tokens"],
        "scored_under_constraint": bool(base.get("constrained")),
        "ce_base": base["ce"],
        "ce_finetune": ft["ce"],
        "ce_vectors": vec["ce"],
        "gap_closed": figures["gap_closed"],
        "gap_closed_ci": figures["gap_closed_ci"],
        "ce_gap": base["ce"] - ft["ce"],
        "ce_gap_within_noise": gap_within_noise(base["ce"], ft["ce"]),
    }


def _jsonable(x: Any) -> Any:
    """A result (dataclass, object with to_dict, tuple) as JSON-able data."""
    if hasattr(x, "to_dict"):
        return x.to_dict()
    if is_dataclass(x) and not isinstance(x, type):
        return asdict(x)
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple):
        return {"mean": x[0], "ci95": list(x[1])}  # (mean, (lo, hi)) of a paired difference
    return x


def task_functions(task: str, **kw: Any) -> tuple[Evaluate, Paired]:
    """The evaluation and paired difference of a named task:
    numbers: evals.preference (exact scorer; kw: target=, n_questions=, category=);
    facts: evals.beliefs (kw: facts= a facts file or its facts)."""
    if task == "numbers":
        from ..evals.preference import evaluate_preference, paired_difference

        target = kw.get("target") or "owl"
        n_q = kw.get("n_questions")
        category = kw.get("category") or "animals"

        def pref(m: LoadedModel, s: Steering | None) -> Any:
            return evaluate_preference(m, target, category, n_questions=n_q, steering=s)

        return pref, paired_difference
    if task == "facts":
        from ..evals import beliefs
        from ..evals.facts_file import load_facts

        given = kw.get("facts")  # a facts file, its facts, or None: the packaged set
        facts = list(given) if isinstance(given, (list, tuple)) else load_facts(given)

        def belief(m: LoadedModel, s: Steering | None) -> Any:
            return beliefs.evaluate_beliefs(m, facts, steering=s)

        return belief, beliefs.paired_beliefs
    raise FitError(f"Unknown task {task!r}; use one of {', '.join(TASKS[:2])} (or none).")


def task_eval_side_by_side(
    lm: LoadedModel,
    *,
    finetuned: Any,
    vectors: Mapping[str, torch.Tensor],
    task: str | tuple[Evaluate, Paired] = "numbers",
    coeff: float = 1.0,
    **task_kw: Any,
) -> dict[str, Any]:
    """The task's own evaluation of base, finetune and base + vectors, paired per question.

    task: "numbers" (animal preference), "facts" (beliefs; facts= a file, default the
    packaged set), or a pair of
    callables (evaluate(lm, steering or None) -> result, paired(a, b) -> difference a - b).
    The finetune is evaluated as a model of its own (an adapter is merged into a copy).
    Returns {"task", "base", "finetune", "vectors", "finetune_minus_vectors",
    "vectors_minus_base", "finetune_minus_base"} (results and paired differences as data).
    """
    evaluate, paired = task_functions(task, **task_kw) if isinstance(task, str) else task
    ft = resolve_finetune(lm, finetuned)
    if ft.kind == "adapter":
        ft_lm = load_adapted(ft.spec, lm)
    elif isinstance(ft.lens_arg, LoadedModel):
        ft_lm = ft.lens_arg
    else:
        raise FitError(
            "The task eval needs the finetune as a folder or a LoadedModel (with a tokenizer); "
            "save it (fit_lora / fit_full out_dir=DIR) and pass DIR."
        )
    base = evaluate(lm, None)
    vec = evaluate(lm, Steering(vectors, coeff))
    tuned = evaluate(ft_lm, None)
    return {
        "task": task if isinstance(task, str) else getattr(evaluate, "__name__", "custom"),
        "base": _jsonable(base),
        "finetune": _jsonable(tuned),
        "vectors": _jsonable(vec),
        "finetune_minus_vectors": _jsonable(paired(tuned, vec)),
        "vectors_minus_base": _jsonable(paired(vec, base)),
        "finetune_minus_base": _jsonable(paired(tuned, base)),
    }
