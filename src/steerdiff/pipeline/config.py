"""Experiment files (TOML or YAML), validated with errors that name the bad field.

The fit and baseline sections embed the library's own settings models: a `[[fits]]` entry
IS a `steerdiff.fit.FitConfig` (plus `name`, `seeds` and `teacher`), so every FitConfig
field is accepted with its own type and checks, and a bad value (e.g. `epochs = 1.5`)
is rejected when the file is loaded, before any stage runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import tomllib
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import SteerdiffError
from ..fit import FitConfig, LoraConfig
from ..fit.sae_train import SAETrainConfig
from ..fuzz import FuzzConfig
from ..layer_profile import ProfileConfig
from ..melbo import MelboConfig
from ..teachers import TeacherConfig
from ..whiten import WhitenStageConfig


class ConfigError(SteerdiffError, ValueError):
    """An experiment file that does not parse or validate; names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# the numbers task's fields (the teacher writes number sequences); the others' below
NUMBERS_FIELDS = (
    "n_prompts",
    "constrained",
    "max_new_tokens",
    "batch_size",
    "temperature",
    "topk_logprobs",
    "backend",
)
FACTS_FIELDS = ("facts", "per_fact", "genres")


class TaskConfig(_Strict):
    """The data the fits train on. name: "numbers" (the teacher writes number sequences),
    "facts" (synthetic documents asserting false facts: tasks.facts.make_documents), or
    "dataset" (bring your own: `data` is a JSONL path or `hf:ORG/NAME[:split]`; setting
    `data` alone means "dataset")."""

    name: Literal["numbers", "facts", "dataset"] = "numbers"
    n_prompts: int = Field(300, gt=0)
    constrained: bool = True
    max_new_tokens: int = Field(56, gt=0)
    batch_size: int = Field(64, gt=0)
    temperature: float = Field(1.0, ge=0)
    topk_logprobs: int = Field(20, ge=0)
    seed: int = 42
    backend: Literal["hf", "vllm"] = "hf"
    # facts: which facts (a YAML/JSON facts file, or "facts": the built-in set), how many
    # documents per fact, which genres (None: all the generator knows)
    facts: str = "facts"
    per_fact: int = Field(20, gt=0)
    genres: list[str] | None = None
    # dataset: a JSONL file ({"messages"}, {"prompt","completion"} or {"text"} rows) or
    # hf:ORG/NAME[:split]
    data: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _data_means_dataset(cls, raw: object) -> object:
        if isinstance(raw, dict) and raw.get("data") is not None and "name" not in raw:
            return {**raw, "name": "dataset"}
        return raw


def _fit_fields(spec: FitConfig, **update: object) -> FitConfig:
    """The FitConfig part of a spec (its extra fields dropped), validated again by FitConfig."""
    values = spec.model_dump(include=set(FitConfig.model_fields))
    return FitConfig.model_validate({**values, **update})


def _positive_lr(lr: float) -> float:
    """An experiment's fit trains: lr must be > 0 (FitConfig itself allows 0, e.g. to
    evaluate a fixed initialisation)."""
    if lr <= 0:
        raise ValueError("must be > 0")
    return lr


class FitSpec(FitConfig):
    """One `[[fits]]` entry: a FitConfig (every field, same types) plus what the run needs.

    `hooks` may be one pattern string. `seeds` runs one fit per seed; without it, the
    FitConfig `seed` (default 0) is the only one.
    """

    name: str
    seeds: list[int] | None = None
    teacher: Literal["main", "prompt"] = "main"  # which dataset: the main teacher's or the prompted

    @field_validator("hooks", mode="before")
    @classmethod
    def _one_pattern(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        return _positive_lr(v)

    @model_validator(mode="after")
    def _seed_list(self) -> FitSpec:
        if self.seeds is None:
            self.seeds = [self.seed]
        elif "seed" in self.model_fields_set:
            raise ValueError("give either seed or seeds, not both")
        return self

    def fit_config(self, seed: int) -> FitConfig:
        """The library FitConfig of the fit with this seed."""
        return _fit_fields(self, seed=seed)


class BaselineSpec(FitConfig):
    """One `[[baselines]]` entry: a LoRA or full finetune on the main teacher's data.

    Its training settings are a FitConfig (no hooks: a baseline trains weights, not
    vectors; lr defaults to 2e-4, seed to the experiment's); `lora` is the library's
    LoRA config (rank `r`, `alpha`, `dropout`, `target_modules`).
    """

    kind: Literal["lora", "full"]
    lora: LoraConfig = Field(default_factory=LoraConfig)
    hooks: list[str] = []
    lr: float = 2e-4

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        return _positive_lr(v)

    @field_validator("hooks")
    @classmethod
    def _no_hooks(cls, v: list[str]) -> list[str]:
        if v:
            raise ValueError("a baseline trains weights, not vectors: remove hooks")
        return v

    def fit_config(self) -> FitConfig:
        """The library FitConfig of this baseline."""
        return _fit_fields(self)


class EvalConfig(_Strict):
    scorer: Literal["exact", "sampling"] = "exact"
    n_questions: int = Field(50, gt=0, le=50)
    n_samples: int = Field(20, gt=0)  # sampling scorer only


class BeliefsConfig(_Strict):
    """`[beliefs]`: belief in false facts (evals.beliefs) of the base model, each LoRA /
    full baseline and each fitted vector set, paired per question. facts: the facts file
    (default: the task's, for task facts)."""

    facts: str | None = None
    n_samples: int = Field(0, ge=0)  # sampled free-form answers per question (0: none)


class FaithfulnessConfig(_Strict):
    """`[faithfulness]`: do the vectors do what the finetune does (interpret.faithfulness)?
    vectors: the fit's name (default: the first fit); finetune: the baseline's kind
    (default: the first baseline); on `texts` texts of the offline corpus; compare_fits:
    the other fits' vector sets against `vectors` too."""

    vectors: str | None = None
    finetune: Literal["lora", "full"] | None = None
    texts: int = Field(64, gt=0)
    seq_len: int = Field(64, gt=0)
    first_k: int = Field(5, gt=0)
    # also compare every other fit (other seeds, other hooks) with `vectors`: do vector sets
    # fitted to the same data have the same effects?
    compare_fits: bool = True


class MisalignmentConfig(_Strict):
    """`[misalignment]`: misalignment of the base model, each LoRA / full baseline and each
    fitted vector set (evals.misalignment), paired per question with the base. bank: a
    question bank file (default: the packaged bank); domains: keep only these; in_domain:
    the narrow dataset's domain, reported against the others. free_form: also the judged
    free-form eval (evals.freeform): `samples` answers per question of up to
    `max_new_tokens`, judged by `judge` ("hf:MODEL": a local Hugging Face model, or
    "openai": an OpenAI-compatible endpoint at judge_base_url serving judge_model)."""

    bank: str | None = None
    domains: list[str] | None = None
    in_domain: str | None = None
    free_form: bool = False
    samples: int = Field(5, gt=0)
    max_new_tokens: int = Field(200, gt=0)
    judge: str = "hf:default"
    judge_model: str | None = None
    judge_base_url: str | None = None

    @field_validator("judge")
    @classmethod
    def _judge(cls, v: str) -> str:
        if v != "openai" and not (v.startswith("hf:") and len(v) > 3):
            raise ValueError("use 'hf:MODEL' (a local Hugging Face model) or 'openai'")
        return v

    def problem(self) -> str | None:
        """What the fields say together that each alone cannot (ExperimentConfig names it
        under `misalignment.`): an in_domain outside domains, an endpoint without a model."""
        if self.in_domain is not None and self.domains is not None:
            if self.in_domain not in self.domains:
                return f"in_domain: {self.in_domain!r} is not one of domains {self.domains}"
        if self.judge == "openai" and self.free_form and not self.judge_model:
            return "judge_model: judge = 'openai' needs the model name the endpoint serves"
        return None


class SAEConfig(_Strict):
    """`[sae]`: every fitted vector set and LoRA / full baseline read in an SAE's latents
    (interpret.sae_read: decomposition, mean latent change on `texts` corpus texts, dashboards
    of the top latents). The SAE: `path` (a SAELens or sparsify folder, a Gemma Scope
    params.npz, or hf:ORG/REPO/FOLDER; `hook` names its hook when the file does not), or a
    `[sae.train]` table (fit.sae_train.SAETrainConfig) to train one first (`hook` picks which
    of its hooks is read; default the last)."""

    path: str | None = None
    hook: str | None = None
    train: SAETrainConfig | None = None
    corpus: str | None = None  # None: the offline default corpus
    texts: int = Field(200, gt=0)
    max_tokens: int = Field(64, gt=0)
    first_k: int = Field(5, gt=0)
    top: int = Field(10, gt=0)
    dashboards: int = Field(5, ge=0)

    @model_validator(mode="after")
    def _one_sae(self) -> SAEConfig:
        if (self.path is None) == (self.train is None):
            raise ValueError(
                "give exactly one of path = 'SAE folder or params.npz' and a [sae.train] table"
            )
        if self.train is not None and self.hook is not None and self.hook not in self.train.hooks:
            raise ValueError(f"hook: {self.hook!r} is not one of train.hooks {self.train.hooks}")
        return self


class ReadConfig(_Strict):
    dla_top_k: int = Field(20, gt=0)
    lens_texts: int = Field(200, ge=0)
    lens_seq_len: int = Field(64, gt=0)
    lens_first_k: int = Field(5, gt=0)


class ExperimentConfig(_Strict):
    name: str
    model: str = "default"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: models.load_model
    device: str = "cpu"
    seed: int = 0
    teacher: TeacherConfig = TeacherConfig()
    prompt_teacher: TeacherConfig | None = None  # an extra system-prompted teacher, run beside
    task: TaskConfig = TaskConfig()
    fits: list[FitSpec] = []
    baselines: list[BaselineSpec] = []
    eval: EvalConfig = EvalConfig()
    read: ReadConfig = ReadConfig()
    beliefs: BeliefsConfig | None = None  # only with a [beliefs] section
    faithfulness: FaithfulnessConfig | None = None  # only with a [faithfulness] section
    misalignment: MisalignmentConfig | None = None  # only with a [misalignment] section
    sae: SAEConfig | None = None  # only with an [sae] section
    # the steering toolbox (issue 16), each only with its section
    whiten: WhitenStageConfig | None = None  # [whiten]
    melbo: MelboConfig | None = None  # [melbo]
    fuzz: FuzzConfig | None = None  # [fuzz]
    profile: ProfileConfig | None = None  # [profile]
    student_model: str | None = None  # cross-family control: fit this model on the teacher's data
    _source: str = PrivateAttr("<experiment>")

    @property
    def source(self) -> str:
        """Where the experiment came from (its file), for error messages."""
        return self._source

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\:") or v.startswith("."):
            raise ValueError("must be a plain folder name (no '/', '\\', ':' or leading '.')")
        return v

    @model_validator(mode="after")
    def _baseline_seed(self) -> ExperimentConfig:
        for b in self.baselines:
            if "seed" not in b.model_fields_set:
                b.seed = self.seed
        return self

    @model_validator(mode="after")
    def _task_fields(self) -> ExperimentConfig:
        """Each task's own fields, and only those (errors name the key: task.KEY)."""
        t = self.task
        if t.name == "dataset" and not t.data:
            raise ValueError(
                "task.data: name = 'dataset' needs data = 'PATH.jsonl' or 'hf:ORG/NAME[:split]'"
            )
        if t.name != "dataset" and t.data is not None:
            raise ValueError(f"task.data: a field of name = 'dataset', not {t.name!r}: remove one")
        if t.name != "numbers" and "teacher" in self.model_fields_set:
            raise ValueError(f"teacher: no teacher writes the data of task {t.name!r}: remove it")
        own = {"numbers": NUMBERS_FIELDS, "facts": FACTS_FIELDS, "dataset": ()}
        for task, fields in own.items():
            wrong = [f for f in fields if f in t.model_fields_set and task != t.name]
            if wrong:
                raise ValueError(
                    f"task.{wrong[0]}: a field of the {task} task, not of {t.name!r}: remove it"
                )
        return self

    @model_validator(mode="after")
    def _narrow_sections(self) -> ExperimentConfig:
        """What [beliefs], [misalignment] and [faithfulness] need that the file alone can tell."""
        if self.beliefs is not None and self.beliefs.facts is None and self.task.name != "facts":
            raise ValueError(
                "beliefs.facts: give the facts file to score (task facts gives its own)"
            )
        if self.misalignment is not None and (why := self.misalignment.problem()):
            raise ValueError(f"misalignment.{why}")
        f = self.faithfulness
        if f is None:
            return self
        names = [s.name for s in self.fits]
        kinds = [b.kind for b in self.baselines]
        if not names or not kinds:
            raise ValueError(
                "faithfulness: compares a fit with a baseline: add a [[fits]] and a [[baselines]]"
            )
        if f.vectors is not None and f.vectors not in names:
            raise ValueError(f"faithfulness.vectors: no fit named {f.vectors!r} (fits: {names})")
        if f.finetune is not None and f.finetune not in kinds:
            raise ValueError(f"faithfulness.finetune: no {f.finetune!r} baseline (have {kinds})")
        return self

    @property
    def trait_eval(self) -> bool:
        """Whether the trait (preference) evaluation runs: the numbers task's teacher has a
        trait; documents and your own datasets have none."""
        return self.task.name == "numbers"


def load_config(path: str | os.PathLike, dtype: str | None = None) -> ExperimentConfig:
    """Read and validate an experiment file; `dtype` replaces the file's `dtype` (the
    `--dtype` of `steerdiff run` / `demo`; validated like the file's own)."""
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
    if dtype is None:
        return parse_config(raw, source=str(path))
    return parse_config({**raw, "dtype": dtype}, source=f"{path} with --dtype {dtype}")


def parse_config(raw: dict, source: str = "<dict>") -> ExperimentConfig:
    """Validate a parsed experiment; ConfigError names every bad field (`loc: what; ...`)."""
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
                lines.append(f"{loc}: unknown field (check the spelling; see examples/)")
            else:
                msg = err["msg"].removeprefix("Value error, ")
                lines.append(f"{loc}: {msg}" if loc else msg)  # a whole-file check names its key
        # one line however many fields are wrong (the CLI prints errors as one line)
        raise ConfigError(f"{source} is not a valid experiment: {'; '.join(lines)}") from None
    cfg._source = source
    return cfg
