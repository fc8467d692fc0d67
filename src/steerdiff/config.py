"""Experiment files (TOML or YAML), validated with errors that name the bad field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import tomllib
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import SteerdiffError
from .teachers import TeacherConfig  # noqa: F401 (the teacher schema lives with Teacher)


class ConfigError(SteerdiffError, ValueError):
    """An experiment file that does not parse or validate; names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskConfig(_Strict):
    name: Literal["numbers"] = "numbers"
    n_prompts: int = Field(300, gt=0)
    constrained: bool = True
    max_new_tokens: int = Field(56, gt=0)
    batch_size: int = Field(64, gt=0)
    temperature: float = Field(1.0, ge=0)
    topk_logprobs: int = Field(20, ge=0)
    seed: int = 42
    backend: Literal["hf", "vllm"] = "hf"


class FitConfigSpec(_Strict):
    name: str
    hooks: list[str] | str
    objective: Literal["sft", "distill"] = "sft"
    optimizer: Literal["adam", "adamw", "sgd", "signsgd"] = "adam"
    lr: float = Field(1e-2, gt=0)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(16, gt=0)
    seeds: list[int] = [0]
    teacher: Literal["main", "prompt"] = (
        "main"  # which dataset: the main teacher's or a prompted one
    )


class BaselineConfig(_Strict):
    kind: Literal["lora", "full"]
    rank: int = 8
    alpha: float = 8.0
    target_modules: list[str] = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    lr: float = 2e-4
    epochs: float = 1.0
    batch_size: int = 16


class EvalConfig(_Strict):
    scorer: Literal["exact", "sampling"] = "exact"
    n_questions: int = Field(50, gt=0, le=50)
    n_samples: int = Field(20, gt=0)  # sampling scorer only


class ReadConfig(_Strict):
    dla_top_k: int = Field(20, gt=0)
    lens_texts: int = Field(200, ge=0)
    lens_seq_len: int = Field(64, gt=0)
    lens_first_k: int = Field(5, gt=0)


class ExperimentConfig(_Strict):
    name: str
    model: str = "default"
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "cpu"
    seed: int = 0
    teacher: TeacherConfig = TeacherConfig()
    prompt_teacher: TeacherConfig | None = None  # an extra system-prompted teacher, run beside
    task: TaskConfig = TaskConfig()
    fits: list[FitConfigSpec] = []
    baselines: list[BaselineConfig] = []
    eval: EvalConfig = EvalConfig()
    read: ReadConfig = ReadConfig()
    student_model: str | None = None  # cross-family control: fit this model on the teacher's data

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\:") or v.startswith("."):
            raise ValueError("must be a plain folder name (no '/', '\\', ':' or leading '.')")
        return v


def load_config(path: str | os.PathLike) -> ExperimentConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"Experiment file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"{path}: use a .toml, .yaml or .yml experiment file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} does not parse: {e}") from e
    return parse_config(raw, source=str(path))


def parse_config(raw: dict, source: str = "<dict>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(f"  {loc}: unknown field (check the spelling; see examples/)")
            else:
                lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(f"{source} is not a valid experiment:\n" + "\n".join(lines)) from None
