"""Fit vector sets (and LoRA / full-finetune baselines) so the model imitates a dataset or a teacher.

Modules, in reading order:
    config.py       FitConfig, LoraConfig, FitResult, FitError
    data.py         rows -> Examples -> Batches, the train / validation split
    losses.py       CE and top-k KL on completion tokens, validation losses, gap closed
    optim.py        optimizers (incl. SignSGD) and the learning-rate schedule
    distributed.py  data-parallel helpers (accelerate / torchrun)
    students.py     what is trained: vectors at hook points (with the prefix cache)
    checkpoint.py   checkpoint.pt, resuming (settings must match), the output folder
    loop.py         the training loop shared by vector fits and baselines
    teacher.py      the teacher inside a fit: reference losses, top-k annotation
    api.py          fit(), evaluate_vectors(), prepare_fit()
    baselines.py    fit_lora(), fit_full(), kl_between()
    planted.py      planted-vector ground truth
"""

from __future__ import annotations

from .api import (
    FitData,
    check_same_model,
    evaluate_vectors,
    fit,
    made_by_other_model,
    model_provenance,
    prepare_fit,
)
from .baselines import (
    FinetuneResult,
    ModelContext,
    ModuleStudent,
    base_context,
    fit_full,
    fit_lora,
    kl_between,
    lora_context,
    vector_context,
)
from .checkpoint import FIT_FILES, LoopState, check_out_dir, run_identity
from .config import LLAMA_TARGETS, FitConfig, FitError, FitResult, LoraConfig, make_config
from .data import (
    Batch,
    Example,
    Prepared,
    Rows,
    TeacherLike,
    check_row,
    collate,
    data_provenance,
    pad_id_of,
    prepare_examples,
    read_rows,
    resolve_objective,
    split_examples,
    teacher_spec,
    tokenize_rows,
)
from .distributed import maybe_init_distributed, rank_world
from .loop import train_student
from .losses import (
    NOISE_GAP_NATS,
    eval_losses,
    gap_closed,
    gap_figures,
    gap_interval,
    gap_within_noise,
    lm_of,
    model_losses,
    result_figures,
    token_losses,
)
from .optim import SignSGD, lr_factor, make_optimizer
from .planted import PlantedResult, cosine, planted_experiment, random_vector, sample_examples
from .students import Student, VectorStudent, init_vectors
from .teacher import annotate_topk, as_teacher, reference_losses, teacher_losses

__all__ = [
    "Batch",
    "Example",
    "FIT_FILES",
    "FinetuneResult",
    "FitConfig",
    "FitData",
    "FitError",
    "FitResult",
    "LLAMA_TARGETS",
    "LoopState",
    "LoraConfig",
    "ModelContext",
    "ModuleStudent",
    "NOISE_GAP_NATS",
    "PlantedResult",
    "Prepared",
    "Rows",
    "SignSGD",
    "Student",
    "TeacherLike",
    "VectorStudent",
    "annotate_topk",
    "as_teacher",
    "base_context",
    "check_out_dir",
    "check_row",
    "check_same_model",
    "collate",
    "data_provenance",
    "cosine",
    "eval_losses",
    "evaluate_vectors",
    "fit",
    "fit_full",
    "fit_lora",
    "gap_closed",
    "gap_figures",
    "gap_interval",
    "gap_within_noise",
    "init_vectors",
    "kl_between",
    "lm_of",
    "lora_context",
    "lr_factor",
    "made_by_other_model",
    "make_config",
    "make_optimizer",
    "maybe_init_distributed",
    "model_losses",
    "model_provenance",
    "pad_id_of",
    "planted_experiment",
    "prepare_examples",
    "prepare_fit",
    "random_vector",
    "rank_world",
    "read_rows",
    "reference_losses",
    "resolve_objective",
    "result_figures",
    "run_identity",
    "sample_examples",
    "split_examples",
    "teacher_losses",
    "teacher_spec",
    "token_losses",
    "tokenize_rows",
    "train_student",
    "vector_context",
]
