"""MELBO: unsupervised steering vectors (issue 16; placeholder, being written).

Mack & Turner, "Mechanistically Eliciting Latent Behaviors in Language Models" (2024).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class MelboConfig(BaseModel):
    """`steerdiff melbo` options and the experiment file's [melbo] table."""

    model_config = ConfigDict(extra="forbid")
