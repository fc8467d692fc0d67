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


def teacher_data(lm: Any, n_prompts: int, max_new_tokens: int = 48, kind: str = "steered") -> Path:
    """The steered teacher's constrained numbers (top-20 log-probs), made once per size;
    kind "plain": the base model's own numbers (the control), same prompts and settings."""
    from steerdiff.tasks.numbers import make_dataset
    from steerdiff.teachers import TeacherConfig, build_teacher

    name = "owl_steered" if kind == "steered" else kind
    out = CACHE / f"{name}_n{n_prompts}_t{max_new_tokens}.jsonl"
    done = out.with_suffix(".done")
    if done.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    vec_file = CACHE / "owl_vector.safetensors"  # written by owl_vector
    t = TeacherConfig(kind="steered", animal=ANIMAL, hook=HOOK, coeff=COEFF, vectors=str(vec_file))
    teacher = build_teacher(t if kind == "steered" else TeacherConfig(kind="plain"), lm)
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


def rows(data: Path, n_train: int, n_val: int) -> list[dict]:
    """The first n_train + n_val rows of the dataset (the fit splits off val_size=n_val).

    Given as rows, not as the file, the fit has no manifest teacher to score, which
    saves a teacher pass over the validation rows (its loss is not needed here)."""
    out = []
    with open(data) as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
            if len(out) == n_train + n_val:
                break
    return out


def cached_share(lm: Any, name: str, n_questions: int, vectors: dict | None = None) -> dict:
    """owl_share of the base model / the teacher, cached on disk (same model, same vector)."""
    path = CACHE / f"share_{name}_q{n_questions}.json"
    if path.exists():
        return json.loads(path.read_text())
    fig = owl_share(lm, n_questions, vectors)
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fig))
    return fig


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


def pinned(**kw: Any) -> Any:
    """A FitConfig with every setting these benches rely on given explicitly, so they run
    the same whatever the defaults are. Settings other branches add (lr_units, converge_tol)
    are pinned to the plain behaviour (absolute lr, all epochs) when FitConfig has them."""
    from steerdiff.fit import FitConfig

    base: dict[str, Any] = dict(
        hooks=[HOOK],
        objective="sft",
        optimizer="adam",
        lr=0.1,
        momentum=0.0,
        betas=(0.9, 0.999),
        weight_decay=0.0,
        schedule="constant",
        warmup_steps=0,
        init="zero",
        init_scale=0.01,
        max_norm=None,
        grad_clip=None,
        epochs=3,
        max_steps=None,
        batch_size=16,
        micro_batch_size=8,
        val_fraction=0.1,
        val_size=16,
        eval_every=0,
        early_stopping_patience=None,
        seed=0,
        progress=True,
    )
    fields = FitConfig.model_fields
    if "lr_units" in fields:
        base["lr_units"] = "absolute"
    if "converge_tol" in fields:
        base["converge_tol"] = None
    return FitConfig(**{**base, **kw})


def distill_config(quick: bool, epochs: int, **kw: Any) -> Any:
    """The top-k distillation fit of one vector at HOOK that the SAE-basis and whitened-fit
    benches share (Adam, lr 0.05 in activation units, cosine, all `epochs`; --quick: 2)."""
    from steerdiff.fit import FitConfig

    base: dict[str, Any] = dict(
        hooks=[HOOK],
        objective="distill",
        optimizer="adam",
        lr=0.05,
        lr_units="activation",
        schedule="cosine",
        warmup_steps=2,
        epochs=2 if quick else epochs,
        converge_tol=0,
        batch_size=8 if quick else 16,
        micro_batch_size=8,
        val_size=8 if quick else 32,
        seed=0,
        progress=False,
    )
    return FitConfig(**{**base, **kw})


def describe(cfg: Any) -> dict:
    return {k: v for k, v in cfg.model_dump().items() if k not in ("progress",)}


def probe_prompts(lm: Any, n: int) -> list[list[int]]:
    """n number prompts in the chat template, none of them in the training data."""
    from steerdiff.tasks.numbers import make_prompts
    from steerdiff.teachers import build_teacher

    plain = build_teacher({"kind": "plain"}, lm)
    return [plain.prompt_ids(u) for u in make_prompts(n, start=100_000)]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().flatten(), b.float().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-12))


def lora_student(
    lm: Any,
    data: list[dict],
    cfg: Any,
    v_star: torch.Tensor,
    probe: list[list[int]],
    n_questions: int,
    base: dict,
    every: int,
    r: int = 8,
) -> dict:
    """A LoRA student (r=alpha=8 on q,k,v,o,gate,up,down, as the paper) fitted on `data`,
    its alignment with v* every `every` steps and its owl share (paired with base)."""
    from steerdiff.fit import FitError, LoraConfig, fit_lora
    from steerdiff.fit.alignment import AlignmentLogger

    lora = LoraConfig(r=r, alpha=float(r), dropout=0.0, target_modules=None)
    logger = AlignmentLogger(probe, HOOK, v_star, every=every, pad_id=pad_of(lm))
    say(f"LoRA {lora.model_dump()} fit {describe(cfg)}")
    clock = Clock()
    try:
        res = fit_lora(lm, data, cfg, lora, on_step=logger)
    except FitError as e:
        return {"error": str(e).splitlines()[0], "alignment": logger.history, **clock.figures()}
    with res.context():  # LoRA injected into lm.model for the block
        share = owl_share(lm, n_questions)
        if not logger.history or logger.history[-1]["step"] != res.steps:
            logger.history.append({"step": res.steps, **logger.measure()})  # the final figures
    last = logger.history[-1]
    return {
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "steps": res.steps,
        "final_val_loss": res.fitted_val_loss,
        "base_val_loss": res.base_val_loss,
        "cos_with_v_star": last["cos_with_teacher_vector"],
        "shift_norm_ratio": last["shift_norm_ratio"],
        "share": share,
        "vs_base": paired(share, base),
        "alignment": logger.history,
        "train_loss": [r["train_loss"] for r in res.metrics],
        **clock.figures(),
    }


def pad_of(lm: Any) -> int:
    tok = lm.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


if __name__ == "__main__":  # make the shared data ahead of the benches
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 320
    torch.set_num_threads(1)
    clock = Clock()
    lm = load()
    v = owl_vector(lm)
    say(f"|v| = {float(v.norm()):.2f}; |v*| = {COEFF * float(v.norm()):.2f}")
    print(teacher_data(lm, n), clock.figures())
