"""Everything about an experiment that can be checked before its first stage runs.

The schema (config.py) checks each field on its own when the file loads. What needs the
model is checked here, right after the models load and before anything is written: the
model specs, every hook name against the model it applies to, the teacher's files, and
the fit settings that depend on each other (a fit on the prompted teacher's data needs a
`[prompt_teacher]`; distillation needs the teacher's top-k log-probs over the student's
own vocabulary). A bad experiment fails in seconds with one line naming the file, the
key and the fix, instead of after the data stage has run for minutes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import SteerdiffError
from ..evals.preference import load_category
from ..hooks import get_hook_point, select_hooks
from ..models import LoadedModel, load_model
from ..teachers import TeacherConfig, sae_latent_vectors
from ..vectors import VectorSet
from .config import ConfigError, ExperimentConfig


def bad(source: str, key: str, value: object, why: str) -> ConfigError:
    """The one-line error for one key of the experiment file."""
    return ConfigError(f"{source}: {key} = {value!r}: {why}")


def load_models(cfg: ExperimentConfig) -> tuple[LoadedModel, LoadedModel]:
    """The teacher's model and the student's (the same object without `student_model`);
    a spec that does not load is reported under its key in the experiment file."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise bad(cfg.source, "device", cfg.device, "no CUDA GPU is visible; use 'cpu'.")
    lm = _load(cfg, "model", cfg.model)
    if cfg.student_model is None:
        return lm, lm
    return lm, _load(cfg, "student_model", cfg.student_model)


def _load(cfg: ExperimentConfig, key: str, spec: str) -> LoadedModel:
    try:
        return load_model(spec, dtype=cfg.dtype, device=cfg.device)
    except SteerdiffError as e:
        raise bad(cfg.source, key, spec, str(e)) from e


def same_tokenizer(a: LoadedModel, b: LoadedModel) -> bool:
    """Whether two models read token ids the same way (same vocabulary, same ids)."""
    return a is b or a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


def check_experiment(cfg: ExperimentConfig, lm: LoadedModel, student_lm: LoadedModel) -> None:
    """Raise ConfigError (one line: file, key, value, fix) for the first problem found."""
    src = cfg.source
    if cfg.trait_eval:  # documents / your own dataset: no teacher
        _check_teacher(src, "teacher", cfg.teacher, lm)
    if cfg.prompt_teacher is not None:
        _check_teacher(src, "prompt_teacher", cfg.prompt_teacher, lm)
    if cfg.task.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        why = "vllm is not installed (pip install vllm), or use backend = 'hf'."
        raise bad(src, "task.backend", "vllm", why)
    if cfg.trait_eval:
        _check_eval_target(cfg)
    else:
        _check_narrow(cfg)
    if cfg.misalignment is not None:
        _check_misalignment(cfg)
    if cfg.sae is not None:
        _check_sae(cfg, student_lm)
    for i, spec in enumerate(cfg.fits):
        _check_fit_hooks(cfg, i, spec.hooks, student_lm, lm)
        if spec.teacher == "prompt" and cfg.prompt_teacher is None:
            why = (
                "the experiment has no [prompt_teacher] to write that data: add one, "
                "or use teacher = 'main'."
            )
            raise bad(src, f"fits.{i}.teacher", "prompt", why)
        _check_fit_settings(cfg, f"fits.{i}", spec.objective, spec.val_size, lm, student_lm)
    for i, b in enumerate(cfg.baselines):
        _check_fit_settings(cfg, f"baselines.{i}", b.objective, b.val_size, lm, student_lm)


def _check_narrow(cfg: ExperimentConfig) -> None:
    """A facts / dataset task: its facts files load, its local dataset exists, and nothing
    asks for a teacher's data (no teacher writes documents or your own dataset)."""
    from ..evals.facts_file import load_facts

    src = cfg.source
    files = [("task.facts", cfg.task.facts)] if cfg.task.name == "facts" else []
    if cfg.beliefs is not None and cfg.beliefs.facts is not None:
        files.append(("beliefs.facts", cfg.beliefs.facts))
    for key, spec in files:
        try:
            load_facts(spec)
        except SteerdiffError as e:
            raise bad(src, key, spec, str(e)) from e
    data = cfg.task.data
    if data is not None and not data.startswith("hf:") and not Path(data).is_file():
        why = "no such file: give a JSONL file of messages, prompt/completion or text rows, or hf:ORG/NAME[:split]."
        raise bad(src, "task.data", data, why)
    if cfg.prompt_teacher is not None:
        why = f"a prompt teacher writes numbers data; task {cfg.task.name!r} has its own data: remove it."
        raise bad(src, "prompt_teacher", cfg.prompt_teacher.kind, why)


def _check_misalignment(cfg: ExperimentConfig) -> None:
    """[misalignment]: its question bank loads, with every domain and in_domain it names."""
    from ..evals.misalignment_bank import load_questions

    m = cfg.misalignment
    assert m is not None
    try:
        qs = load_questions(m.bank)
    except SteerdiffError as e:
        raise bad(cfg.source, "misalignment.bank", m.bank, str(e)) from e
    have = list(dict.fromkeys(q.domain for q in qs))
    for key, names in (
        ("domains", m.domains or []),
        ("in_domain", [m.in_domain] if m.in_domain else []),
    ):
        for d in names:
            if d not in have:
                why = f"the question bank has no domain {d!r}; its domains are {', '.join(have)}."
                raise bad(cfg.source, f"misalignment.{key}", d, why)
    if m.free_form and importlib.util.find_spec("steerdiff.evals.freeform") is None:
        why = "this install has no steerdiff.evals.freeform (the judged eval): set it to false."
        raise bad(cfg.source, "misalignment.free_form", True, why)
    if m.free_form and m.judge == "openai" and importlib.util.find_spec("openai") is None:
        why = "the HTTP judge needs the openai package: pip install openai, or judge = 'hf:MODEL'."
        raise bad(cfg.source, "misalignment.judge", m.judge, why)


def _check_eval_target(cfg: ExperimentConfig) -> None:
    """The evaluation (the last stage) can score the teacher's trait."""
    t = cfg.teacher
    category = "animals" if t.category == "animal" else t.category
    try:
        candidates = [c.lower() for c in load_category(category).candidates]
    except SteerdiffError as e:
        raise bad(cfg.source, "teacher.category", t.category, str(e)) from e
    if t.animal.lower() not in candidates:
        names = ", ".join(candidates)
        why = f"the evaluation cannot score it: not among the {category} candidates ({names})."
        raise bad(cfg.source, "teacher.animal", t.animal, why)


def _check_fit_hooks(
    cfg: ExperimentConfig, i: int, hooks: list[str], student_lm: LoadedModel, lm: LoadedModel
) -> None:
    """Every hook pattern of fit i matches a hook of the model it fits (the student's)."""
    which = "the student model" if student_lm is not lm else "the model"
    try:
        select_hooks(student_lm, hooks)
    except SteerdiffError as e:
        value = hooks if len(hooks) > 1 else hooks[0]
        why = f"not a hook of {which} {student_lm.spec!r}: {e}"
        raise bad(cfg.source, f"fits.{i}.hooks", value, why) from e


def _check_teacher(src: str, key: str, t: TeacherConfig, lm: LoadedModel) -> None:
    """The teacher's hook on its model, and the files it names."""
    if t.kind == "steered" or t.ablate_from_hook:
        try:
            get_hook_point(lm, t.hook)
        except SteerdiffError as e:
            raise bad(
                src, f"{key}.hook", t.hook, f"not a hook of the model {lm.spec!r}: {e}"
            ) from e
    if t.vectors is not None and t.kind == "steered":
        try:
            VectorSet.load(t.vectors, model=lm)
        except SteerdiffError as e:
            raise bad(src, f"{key}.vectors", t.vectors, str(e)) from e
    if t.kind == "sae":  # the SAE loads, fits the model, and has the latent
        try:
            sae_latent_vectors(t.spec(), lm)
        except SteerdiffError as e:
            raise bad(src, f"{key}.sae", t.sae, str(e)) from e
    if t.kind == "adapter" and (t.adapter is None or not Path(t.adapter).is_dir()):
        raise bad(
            src,
            f"{key}.adapter",
            t.adapter,
            "an adapter teacher needs the folder of a "
            "finetuned model or LoRA adapter; no such folder.",
        )


def _check_fit_settings(
    cfg: ExperimentConfig,
    key: str,
    objective: str,
    val_size: int | None,
    lm: LoadedModel,
    student_lm: LoadedModel,
) -> None:
    src = cfg.source
    if objective == "distill" and cfg.task.topk_logprobs == 0:
        raise bad(
            src,
            f"{key}.objective",
            "distill",
            "distillation needs the teacher's top-k "
            "log-probs: set task.topk_logprobs > 0 (e.g. 20), or use objective = 'sft'.",
        )
    if objective == "distill" and not same_tokenizer(lm, student_lm):
        raise bad(
            src,
            f"{key}.objective",
            "distill",
            f"the teacher's top-k log-probs are over "
            f"the vocabulary of {lm.spec!r}, not that of the student model "
            f"{student_lm.spec!r}: use objective = 'sft' for a student of another tokenizer.",
        )
    if cfg.trait_eval and val_size is not None and val_size >= cfg.task.n_prompts:
        raise bad(
            src,
            f"{key}.val_size",
            val_size,
            f"leaves no training rows of at most "
            f"task.n_prompts = {cfg.task.n_prompts}: lower val_size.",
        )


def _check_sae(cfg: ExperimentConfig, lm: LoadedModel) -> None:
    """[sae]: the SAE at `path` loads and fits the (student) model, or [sae.train] can train."""
    from ..errors import SteerdiffError
    from ..fit.sae_train import check_config
    from ..sae import load_sae

    s = cfg.sae
    assert s is not None
    try:
        if s.path is not None:
            load_sae(s.path, lm, hook=s.hook)
        else:
            assert s.train is not None
            check_config(s.train, lm)
    except SteerdiffError as e:
        key, value = ("sae.path", s.path) if s.path is not None else ("sae.train", s.train.hooks)
        raise bad(cfg.source, key, value, str(e)) from None
