"""Layer profiles across model families (issue 16; placeholder, being written)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ProfileConfig(BaseModel):
    """`steerdiff sweep --profile` options and the experiment file's [profile] table."""

    model_config = ConfigDict(extra="forbid")
