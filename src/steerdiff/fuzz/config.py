"""`steerdiff fuzz` options and the experiment file's [fuzz] table."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .curve import check_eval

DEFAULT_DEPTHS = (0.2, 0.4, 0.6)  # layers = these fractions of the depth when none are given


class FuzzConfig(BaseModel):
    """What to fuzz, how hard, and which eval to read.

    hooks (or layers: blocks.{l}.hook_resid_post; neither: the layers at 20%, 40% and 60% of
    the depth); scales: noise scales (isotropic: relative to each token's RMS; whitened: in
    the data's standard deviations, with one Gaussian file per hook in `whiten`); seeds: how
    many noise seeds (0..seeds-1); n_questions: questions of the eval, spread over the bank.
    pair (the [fuzz] table only): two model specs to compare; default base vs each fitted
    vector set and baseline of the run."""

    model_config = ConfigDict(extra="forbid")

    eval: str = "preference"
    target: str = "owl"
    category: str = "animals"
    questions: str | None = None  # misalignment: a question bank file (default: built-in)
    hooks: list[str] = Field(default_factory=list)
    layers: list[int] = Field(default_factory=list)
    scales: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0])
    seeds: int = Field(2, ge=1)
    noise: Literal["isotropic", "whitened"] = "isotropic"
    whiten: list[str] = Field(default_factory=list)
    n_questions: int | None = Field(20, ge=2)
    pair: list[str] | None = None

    @field_validator("eval")
    @classmethod
    def _known_eval(cls, v: str) -> str:
        return check_eval(v)

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if not v or any(not (s >= 0) or s == float("inf") for s in v):
            raise ValueError(f"scales must be finite numbers >= 0 (got {v}), e.g. 0,0.5,1")
        if not any(s > 0 for s in v):
            raise ValueError(f"scales {v} hold no scale > 0: add some, e.g. 0,0.5,1")
        return sorted(set(float(s) for s in v))

    @field_validator("pair")
    @classmethod
    def _pair(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(v) != 2:
            raise ValueError(f"pair names two model specs (got {len(v)}), e.g. ['base', 'x']")
        return v
