"""fit(): a VectorSet fitted to a dataset (steering-vector distillation, all model weights
frozen), and evaluate_vectors() for vectors fitted earlier.

Every fit (vectors here, LoRA and full finetunes in fit.baselines) starts the same way,
`prepare_fit`: read and tokenize the data, split off validation rows, and score them
under the base model and the teacher; then `FitData.train` runs the shared loop.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..dtypes import dtype_name
from ..hooks import HookError, family_of, select_hooks, steer
from ..io import atomic_write_json, provenance
from ..models import LoadedModel, unwrap, weights_hash_of_model, wrap_model
from ..replay import full_hidden
from ..teachers import Teacher
from ..vectors import VectorSet
from .config import FitConfig, FitError, FitResult, make_config
from .data import (
    Example,
    Rows,
    TeacherLike,
    pad_id_of,
    prepare_examples,
    resolve_objective,
    split_examples,
    wants_validation,
)
from .data import (
    teacher_spec as teacher_spec_of,
)
from .distributed import maybe_init_distributed, rank_world
from .latent import (
    LatentStudent,
    finish_latent_fit,
    latent_provenance,
    record_code,
    sae_basis,
    trained_vectors,
)
from .loop import train_student
from .losses import eval_losses, result_figures
from .online import OnlineTeacher, online_eval, online_losses
from .students import Student, VectorStudent, init_vectors
from .teacher import as_teacher, online_problem, reference_losses
from .whitened import finish_whitened_fit, whitened_norms

Data = str | os.PathLike | Rows | Sequence[dict] | Sequence[Example]


@dataclass
class FitData:
    """What a fit of a model to a dataset starts from."""

    train: list[Example]
    val: list[Example]
    teacher: dict  # the teacher spec (recorded in provenance and in the fitted vectors)
    base_val: dict | None  # eval_losses of the base model on val (None without val rows)
    teacher_val: dict | None  # ... of the teacher (None for a plain teacher)
    pad_id: int
    objective: str = "sft"  # what cfg.objective "auto" resolves to on this data
    notes: list[str] = field(default_factory=list)  # said on stderr, kept in result.json
    data: dict = field(default_factory=dict)  # data_provenance: "data" in result.json
    # for `score` (prepare_fit(score=False) leaves base_val / teacher_val to it)
    lm: Any = None
    scorer: TeacherLike = None
    batch_size: int = 16
    show_progress: bool = False

    _teacher: Teacher | None = None

    def built_teacher(self) -> Teacher | None:
        """The scoring teacher as a Teacher, built once (None for a plain one)."""
        kind = self.scorer.kind if isinstance(self.scorer, Teacher) else None
        if kind is None:
            kind = dict(teacher_spec_of(self.scorer)).get("kind", "plain")
        if kind == "plain":
            return None
        if self._teacher is None:
            self._teacher = as_teacher(self.scorer, self.lm)
        return self._teacher

    def online_teacher(self, cfg: FitConfig) -> OnlineTeacher | None:
        """What objective "online" distils from (None for other objectives)."""
        if self.config(cfg).objective != "online":
            return None
        t = self.built_teacher()
        assert t is not None  # prepare_fit checked that there is one (online_problem)
        return OnlineTeacher(t, self.pad_id, cfg.online_prompt_positions)

    def teacher_vectors(self) -> dict[str, torch.Tensor] | None:
        """A steered (or SAE-latent) teacher's vectors, coeff x v per hook (what a fit can be
        compared to)."""
        spec = teacher_spec_of(self.scorer)
        if spec.get("kind") not in ("steered", "sae"):
            return None
        t = self.built_teacher()
        if t is None or t.vectors is None:
            return None
        return {h: t.coeff * t.vectors[h].detach().float().cpu() for h in t.vectors}

    def score(self) -> None:
        """Fill base_val / teacher_val (the slow part: a pass of each model over val);
        objective "online": the base model's online KL to the teacher too."""
        if self.val and self.base_val is None:
            scorer = self.built_teacher() or self.scorer
            self.base_val, self.teacher_val = reference_losses(
                self.lm, self.val, scorer, self.batch_size, self.show_progress
            )
            if self.objective == "online":
                self.base_val = self.base_online(self.base_val)

    def base_online(self, base_val: dict) -> dict:
        """The base model's validation losses with its online KL to the teacher."""
        ev = self.online_val(None, "base model's online KL to the teacher")
        return {**base_val, "kl": ev["kl"], "rows": ev["rows"]}

    def online_val(self, vectors: Any, desc: str) -> dict:
        """`eval_losses` of the base model + `vectors` on val, its KL the online KL."""
        model, t = unwrap(self.lm), self.built_teacher()
        assert t is not None
        online = OnlineTeacher(t, self.pad_id)

        def losses(batch: Any, _bi: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
            with steer(model, vectors or {}):
                hidden = full_hidden(model, batch.input_ids, batch.attention_mask)
            return online_losses(model, hidden, batch, target)

        desc = desc if self.show_progress else None  # type: ignore[assignment]
        return online_eval(model, self.val, online, losses, self.batch_size, self.pad_id, desc)

    def config(self, cfg: FitConfig) -> FitConfig:
        """`cfg` with objective "auto" resolved for this data."""
        if cfg.objective != "auto":
            return cfg
        return cfg.model_copy(update={"objective": self.objective})

    def train_student(self, student: Student, cfg: FitConfig, **kwargs: Any) -> FitResult:
        """`loop.train_student` on this data; kwargs: out_dir, resume, prov, on_step, ...

        Resuming from a checkpoint takes the reference losses from it (its settings are
        checked first, in seconds); otherwise they are scored here if not yet."""
        if not resumes(kwargs.get("out_dir"), kwargs.get("resume", False)):
            self.score()
        extra = {
            "objective": self.objective,
            "n_train_rows": len(self.train),
            "notes": self.notes,
            "data": self.data,
            **kwargs.pop("extra", {}),
        }
        return train_student(
            student,
            self.train,
            self.val,
            self.config(cfg),
            pad_id=self.pad_id,
            base_val=self.base_val,
            teacher_val=self.teacher_val,
            extra=extra,
            teacher=self.online_teacher(cfg),
            teacher_vectors=self.teacher_vectors(),
            **kwargs,
        )


def resumes(out_dir: str | os.PathLike | None, resume: bool) -> bool:
    """Will a fit with these arguments resume from a checkpoint?"""
    return bool(resume and out_dir is not None and (Path(out_dir) / "checkpoint.pt").exists())


def prepare_fit(
    lm: LoadedModel | nn.Module,
    data: Data,
    cfg: FitConfig,
    teacher: TeacherLike = None,
    score: bool = True,
) -> FitData:
    """Examples, the seeded split, and the base model's and teacher's validation losses
    (score=False: left to `FitData.score`, which `FitData.train_student` calls unless it
    resumes from a checkpoint).

    teacher: a Teacher (used as it is; it must run on `lm`'s model), a TeacherConfig or a
    spec dict (built once on `lm`); None = the dataset manifest's teacher, unless the data
    was made by another model (then there is no teacher loss: a teacher of another model
    has none on the student's model, and the student is compared with its own base).
    Notes (re-tokenized completions, a dropped teacher) are printed on stderr, one line each.
    """
    rank, _ = maybe_init_distributed()
    if isinstance(teacher, Teacher):
        check_same_model(teacher, lm)
    p = prepare_examples(lm, data, teacher, cfg.max_len, cfg.constrained_scoring)
    scorer: TeacherLike = teacher if isinstance(teacher, Teacher) else p.teacher
    if teacher is None and p.teacher and (p.retokenized or made_by_other_model(p.manifest, lm)):
        made_by = (p.manifest.get("provenance") or {}).get("model_id", "another model")
        p.notes.append(
            f"the data's teacher runs on {made_by}, not on the student's model: it has no "
            "loss on the student's model, so the fit is compared with the student's own base "
            "only (no teacher loss, no gap closed); pass teacher=... to score one"
        )
        scorer = {"kind": "plain"}
    objective, why = choose_objective(cfg, p.examples, p.retokenized, scorer)
    if wants_validation(cfg) and len(p.examples) < 2:
        raise FitError(
            f"{p.source} has {len(p.examples)} usable row: a fit with validation needs at "
            "least 2 (1 to train on, 1 to validate on). Add rows, or set val_size=0 "
            "(--val-size 0) to fit without validation figures."
        )
    train, val = split_examples(p.examples, cfg)
    if rank == 0:
        for note in p.notes:
            print(f"note: {note}", file=sys.stderr, flush=True)
        if cfg.progress:
            print(
                f"fit: objective {objective}{why}; {len(train)} training rows, "
                f"{len(val)} validation rows",
                file=sys.stderr,
                flush=True,
            )
    d = FitData(train, val, p.teacher, None, None, pad_id_of(lm), objective, p.notes, p.data)
    d.lm, d.scorer, d.batch_size, d.show_progress = lm, scorer, cfg.micro, cfg.progress
    if score:
        d.score()
    return d


def choose_objective(
    cfg: FitConfig, examples: list[Example], retokenized: bool, scorer: TeacherLike
) -> tuple[str, str]:
    """(the objective, why): "online" when asked, or for "auto" when the teacher can run
    on the student's model (`online_problem` is None); else `resolve_objective` (distill
    on stored top-k, else sft). FitError naming the fix for "online" without a teacher."""
    if cfg.objective not in ("auto", "online"):
        return resolve_objective(cfg, examples, retokenized)
    problem = online_problem(scorer, examples)
    if cfg.objective == "online":
        if problem:
            raise FitError(
                f"objective 'online' needs a teacher that runs on the student's model, but "
                f"{problem}. Pass teacher=... to fit() (a steered, prompt or adapter teacher "
                "spec), make the data with `steerdiff generate` (its manifest names the "
                "teacher), or use --objective distill / sft."
            )
        return "online", ""
    if problem is None:
        kind = teacher_spec_of(scorer).get("kind")
        return "online", f" (auto: the {kind} teacher runs here: its full distribution)"
    return resolve_objective(cfg, examples, retokenized)


def _describe(lm: LoadedModel) -> str:
    c = lm.model.config
    return (
        f"{lm.spec} ({c.model_type}, {c.num_hidden_layers} layers, vocab {c.vocab_size}, "
        f"weights {lm.weights_hash})"
    )


def check_same_model(teacher: Teacher, lm: LoadedModel | nn.Module) -> None:
    """FitError unless `teacher` runs on the student's model (the same weights; for an
    adapter teacher, a finetune of the same architecture): a teacher of another model has
    no losses on the student's model."""
    student = lm if isinstance(lm, LoadedModel) else wrap_model(lm, spec="student", weights_hash="")
    t, s = teacher.lm.model, student.model
    if t is s:
        return
    arch = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")
    same = all(getattr(t.config, a, None) == getattr(s.config, a, None) for a in arch)
    if same and teacher.kind != "adapter":
        same = _weights_hash(teacher.lm) == _weights_hash(student)
    if not same:
        raise FitError(
            f"The teacher runs on another model than the student: teacher "
            f"{_describe(teacher.lm)}, student {_describe(student)}. A teacher of another "
            "model has no losses on the student's model: pass no teacher (the fit is then "
            "compared with the student's own base) or a teacher built on the student's model."
        )


def _weights_hash(lm: LoadedModel) -> str:
    if lm.weights_hash in ("", "in-memory"):
        lm.weights_hash = weights_hash_of_model(lm.model)
    return lm.weights_hash


def made_by_other_model(manifest: dict, lm: LoadedModel | nn.Module) -> bool:
    """Does the manifest's provenance name another model (weights hash) than `lm`?"""
    made = (manifest.get("provenance") or {}).get("weights_hash")
    if not made or not isinstance(lm, LoadedModel) or lm.weights_hash in ("", "in-memory"):
        return False
    return made != lm.weights_hash


def model_provenance(lm: LoadedModel | nn.Module, cfg: FitConfig) -> dict:
    """provenance() plus model id / weights hash also for a bare (in-memory) module."""
    prov = provenance(lm, cfg, cfg.seed)
    if not isinstance(lm, LoadedModel):
        prov.update(
            model_id="in-memory",
            model_type=lm.config.model_type,
            weights_hash=weights_hash_of_model(lm),
            dtype=dtype_name(lm.dtype),
        )
    return prov


def fit(
    lm: LoadedModel | nn.Module,
    data: Data,
    config: FitConfig | None = None,
    *,
    teacher: TeacherLike = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
    **overrides: Any,
) -> FitResult:
    """Fit trainable vectors at `config.hooks` (all model weights frozen) to a dataset.

    data: a dataset JSONL path (its manifest gives the teacher; with none, any of the
    formats of docs/dataset-format.md), "hf:ORG/NAME[:split]" (a Hugging Face dataset),
    rows, or Examples. result.json and the vectors' metadata record its provenance
    ("data": format, sha256, rows, examples, chunks, source). teacher: overrides the manifest's teacher (a spec dict, a
    TeacherConfig or a built Teacher; used for the teacher's validation loss and the gap
    closed). out_dir: checkpoints, metrics.jsonl / .csv, vectors.safetensors,
    result.json. resume: continue from out_dir's checkpoint.
    """
    cfg = make_config(config, overrides)
    model = unwrap(lm)
    family_of(model)
    cfg, sae = sae_basis(lm, cfg)  # basis "sae": its SAE, and hooks = the SAE's hook
    try:
        names = select_hooks(model, cfg.hooks)
    except HookError as e:
        raise FitError(f"Hook selection {cfg.hooks} matches no hook point: {e}") from e
    whitened = whitened_norms(lm, names, cfg, out_dir)  # a wrong Gaussian: said before the data
    d = prepare_fit(lm, data, cfg, teacher, score=False)  # scored in d.train_student
    cfg = d.config(cfg)  # objective "auto" resolved
    model.requires_grad_(False)
    student: Student = (
        LatentStudent(model, sae, cfg)
        if sae is not None
        else VectorStudent(model, init_vectors(model, names, cfg), cfg)
    )
    if isinstance(student, VectorStudent):
        student.whitened = whitened
    prov = {**model_provenance(lm, cfg), "teacher": d.teacher, "hooks": names}
    prov.update(latent_provenance(sae))
    if whitened is not None:  # a resume in other Gaussians (a replaced file) is refused
        prov["whiten_sha256"] = whitened.fingerprint()

    def save(out: Path, params: dict[str, torch.Tensor], summary: dict) -> None:
        summary = record_code(student, summary, out)  # basis "sae": latent_code.safetensors
        if whitened is not None:
            summary = {**summary, **whitened.figures(params)}
        vs = _vector_set(lm, trained_vectors(student), cfg, summary, d.teacher, d.data)
        vs.save(out / "vectors.safetensors")

    if rank_world()[0] == 0 and out_dir is not None and not resumes(out_dir, resume):
        # (a resumed fit keeps the config.json of its start: the checkpoint holds the same)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out_dir) / "config.json", {"config": cfg.model_dump(), **prov})
    res = d.train_student(
        student, cfg, out_dir=out_dir, resume=resume, prov=prov, on_step=on_step, save_params=save
    )
    finish_latent_fit(student, res)  # basis "sae": the code's summary in res and result.json
    finish_whitened_fit(whitened, student.params, res)  # the vectors' whitened norms
    res.vectors = _vector_set(lm, trained_vectors(student), cfg, res.summary(), d.teacher, d.data)
    return res


def _vector_set(
    lm: LoadedModel | nn.Module,
    params: dict[str, torch.Tensor],
    cfg: FitConfig,
    summary: dict,
    teacher: dict,
    data: dict | None = None,
) -> VectorSet:
    return VectorSet.for_model(
        lm,
        {k: v.detach().cpu().clone() for k, v in params.items()},
        method=f"fit:{cfg.objective}",
        positions="all",
        fit_config=cfg.model_dump(),
        fit_summary=summary,
        teacher=teacher,
        data=data or {},
    )


def evaluate_vectors(
    lm: LoadedModel | nn.Module,
    data: Data,
    vectors: VectorSet | dict[str, torch.Tensor],
    config: FitConfig | None = None,
    *,
    teacher: TeacherLike = None,
) -> dict[str, Any]:
    """Validation losses of base / teacher / base + `vectors` on the rows a fit with
    `config` holds out (same seed, same split), the gap closed and its bootstrap intervals.

    For vectors fitted earlier (or by someone else): the figures `fit` reports at its end.
    """
    cfg = config or FitConfig()
    d = prepare_fit(lm, data, cfg, teacher)
    if not d.val or d.base_val is None:
        raise FitError("No validation rows: set val_size or val_fraction above 0.")
    model = unwrap(lm)
    if isinstance(vectors, VectorSet):
        vectors.check_fits(model)  # a VectorSetError names the hook or shape that differs
    if d.objective == "online":  # the same KL as the base's (online, not top-k)
        ev = d.online_val(vectors, "fitted model's online KL to the teacher")
    else:
        with steer(model, vectors):
            desc = "fitted model on validation rows" if cfg.progress else None
            ev = eval_losses(model, d.val, cfg.micro, d.pad_id, desc=desc)
    return {
        "base_val_loss": d.base_val["ce"],
        "teacher_val_loss": d.teacher_val["ce"] if d.teacher_val else None,
        "fitted_val_loss": ev["ce"],
        **result_figures(d.base_val, ev, d.teacher_val),
    }
