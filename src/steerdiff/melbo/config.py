"""MelboConfig: the options of `steerdiff melbo` and the experiment file's [melbo] table."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import SteerdiffError

EVALS = ("preference", "misalignment", "coherence")  # what each vector can be evaluated on


class MelboError(SteerdiffError, ValueError):
    """MELBO options or inputs that cannot work; the message says what to change."""


def parse_evals(spec: str | list[str] | None) -> list[str]:
    """'preference,coherence' (or a list) -> the eval names; an unknown one is one line."""
    if spec is None:
        return []
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [s for s in names if s]
    for s in names:
        if s not in EVALS:
            raise MelboError(
                f"unknown eval {s!r} in --evals; the known evals are {', '.join(EVALS)}."
            )
    return list(dict.fromkeys(names))


class MelboConfig(BaseModel):
    """`steerdiff melbo` options and the experiment file's [melbo] table.

    Training (Mack & Turner 2024): n_vectors vectors of norm `radius` added at source_hook
    (every position), each maximising sum over prompts of (sum over positions of
    ||Z_target(theta) - Z_target(0)||_2^p)^(1/q) at target_hook, each orthogonal to the
    earlier ones; the first `skip_first` positions of each prompt (attention-sink tokens with
    massive activations) are left out of the sum (0: every position, as published). norm "whitened": the radius and the orthogonality are in the whitened
    metric of a Gaussian at source_hook (`whiten`: a saved steerdiff.whiten Gaussian; else
    one fitted on `whiten_texts` corpus texts).
    """

    model_config = ConfigDict(extra="forbid")

    source_hook: str = "blocks.6.hook_resid_post"
    target_hook: str = "blocks.20.hook_resid_post"
    n_vectors: int = Field(8, ge=1)
    radius: float = 4.0
    norm: Literal["l2", "whitened"] = "l2"
    whiten: str | None = None  # a Gaussian file (steerdiff.whiten) at source_hook
    whiten_texts: int = Field(200, ge=2)  # corpus texts to fit one when `whiten` is not given
    p: float = Field(2.0, gt=0)
    q: float | None = Field(None, gt=0)  # None: q = p (the published default)
    steps: int = Field(100, ge=1)
    lr: float = Field(0.01, gt=0)
    prompts: str | None = None  # a .txt file, one user message a line; None: packaged questions
    n_prompts: int = Field(8, ge=1)
    max_tokens: int = Field(64, ge=2)
    skip_first: int = Field(1, ge=0)  # first positions left out of the objective (0: published)
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    # the radius sweep (empty: none): one vector trained per radius, and random vectors
    radii: list[float] = Field(default_factory=list)
    sweep_steps: int | None = Field(None, ge=1)  # None: steps
    n_random: int = Field(4, ge=1)
    # the evaluations of each vector (steering at source_hook, coefficient 1)
    evals: list[str] = Field(default_factory=list)
    target: str = "owl"  # the preference eval's trait
    category: str = "animals"
    n_questions: int = Field(20, ge=1)
    n_samples: int = Field(3, ge=0)  # prompts with a sampled completion per vector
    sample_tokens: int = Field(40, ge=1)

    @field_validator("radius")
    @classmethod
    def _positive_radius(cls, r: float) -> float:
        if not r > 0:
            raise ValueError(f"the radius must be > 0 (got {r}); give the vectors' norm, e.g. 4")
        return r

    @field_validator("radii")
    @classmethod
    def _positive_radii(cls, radii: list[float]) -> list[float]:
        bad = [r for r in radii if not r > 0]
        if bad:
            raise ValueError(f"every radius must be > 0 (got {bad}); e.g. 0.5,1,2,4,8")
        return sorted(radii)

    @field_validator("evals", mode="before")
    @classmethod
    def _known_evals(cls, v: str | list[str] | None) -> list[str]:
        try:
            return parse_evals(v)
        except MelboError as e:
            raise ValueError(str(e)) from None

    @property
    def q_(self) -> float:
        return self.p if self.q is None else self.q
