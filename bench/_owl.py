"""Shared setup of the claim 2-4 benches (bench_alignment, bench_optimizers, bench_controls).

The steered teacher is the demo's (src/steerdiff/data/demo.toml): the embedded
SmolLM2-135M-Instruct plus 2.0 x the owl system-prompt contrast vector (readout "last") at
blocks.24.hook_resid_post, all positions, no system prompt. It writes constrained number
lists (with its top-20 log-probs) once; the dataset is cached under bench/results/.cache
(keyed by its sizes) so the three benches train on the same rows.

Every figure is the exact preference scorer's owl share (candidate answer probabilities
normalised over the animal candidates, mean over questions, 95% CI across questions).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

HOOK = "blocks.24.hook_resid_post"
COEFF = 2.0
ANIMAL = "owl"
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = RESULTS / ".cache"


class Clock:
    """Wall and CPU seconds since creation (CPU of this process and its children)."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), _cpu()

    def figures(self) -> dict[str, float]:
        return {
            "wall_s": round(time.perf_counter() - self.wall0, 1),
            "cpu_s": round(_cpu() - self.cpu0, 1),
        }


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load() -> Any:
    from steerdiff.models import load_model

    lm = load_model()
    say(f"model {lm.spec} dtype {lm.model.dtype}")
    return lm


def owl_vector(lm: Any) -> torch.Tensor:
    """The owl contrast vector at HOOK (readout last), unscaled; cached on disk."""
    from steerdiff.extract import trait_vectors
    from steerdiff.vectors import VectorSet

    path = CACHE / "owl_vector.safetensors"
    if path.exists():
        return VectorSet.load(path, model=lm)[HOOK].float()
    vs = trait_vectors(lm, ANIMAL, readouts="last", hooks=[HOOK])["last"]
    CACHE.mkdir(parents=True, exist_ok=True)
    vs.save(path)
    return vs[HOOK].float()


def teacher_data(lm: Any, n_prompts: int, max_new_tokens: int = 48) -> Path:
    """The steered teacher's constrained numbers (top-20 log-probs), made once per size."""
    from steerdiff.tasks.numbers import make_dataset
    from steerdiff.teachers import TeacherConfig, build_teacher

    out = CACHE / f"owl_steered_n{n_prompts}_t{max_new_tokens}.jsonl"
    done = out.with_suffix(".done")
    if done.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    vec_file = CACHE / "owl_vector.safetensors"  # written by owl_vector
    t = TeacherConfig(kind="steered", animal=ANIMAL, hook=HOOK, coeff=COEFF, vectors=str(vec_file))
    teacher = build_teacher(t, lm)
    manifest = make_dataset(
        teacher,
        str(out),
        n_prompts=n_prompts,
        constrained=True,
        topk=20,
        batch_size=16,
        max_new_tokens=max_new_tokens,
        seed=0,
        temperature=1.0,
    )
    done.write_text(json.dumps({k: manifest.get(k) for k in ("n_prompts", "n_valid")}))
    return out


def owl_share(lm: Any, n_questions: int, vectors: dict | None = None, coeff: float = 1.0) -> dict:
    """Exact-scorer owl share of `lm` (optionally + vectors at all positions) with its CI."""
    from steerdiff.evals.preference import exact_preference
    from steerdiff.evals.steering import Steering

    steering = Steering(vectors, coeff=coeff) if vectors else None
    r = exact_preference(lm, ANIMAL, n_questions=n_questions, steering=steering)
    return share_of(r)


def share_of(r: Any) -> dict:
    return {
        "owl_share": round(r.target_rate, 4),
        "ci95": [round(r.ci95[0], 4), round(r.ci95[1], 4)],
        "n_questions": r.n_questions,
        "per_question": [q["target_rate"] for q in r.per_question],
    }


def paired(a: dict, b: dict) -> dict:
    """a - b per question, mean and 95% CI across questions (same questions, same order)."""
    d = [x - y for x, y in zip(a["per_question"], b["per_question"], strict=True)]
    n = len(d)
    m = sum(d) / n
    sd = (sum((x - m) ** 2 for x in d) / max(n - 1, 1)) ** 0.5
    h = 1.96 * sd / n**0.5
    return {"diff": round(m, 4), "ci95": [round(m - h, 4), round(m + h, 4)], "n_questions": n}


def strip(fig: dict) -> dict:
    """A share figure without its per-question list (for printing)."""
    return {k: v for k, v in fig.items() if k != "per_question"}


def write_json(path: str | os.PathLike, obj: dict) -> None:
    from steerdiff.io import atomic_write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(path), obj)
    say(f"wrote {path}")


if __name__ == "__main__":  # make the shared data ahead of the benches
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 320
    torch.set_num_threads(1)
    clock = Clock()
    lm = load()
    v = owl_vector(lm)
    say(f"|v| = {float(v.norm()):.2f}; |v*| = {COEFF * float(v.norm()):.2f}")
    print(teacher_data(lm, n), clock.figures())
