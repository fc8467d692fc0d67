"""MELBO results on disk: one VectorSet per vector (usable as `--vectors` anywhere), each
stamped with the settings that trained it, so a rerun skips the vectors already done."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models import LoadedModel
from ..vectors import VectorSet
from ..whiten import Gaussian
from .config import MelboConfig, MelboError

TRAIN_FIELDS = (
    "source_hook",
    "target_hook",
    "radius",
    "norm",
    "whiten",
    "whiten_texts",
    "p",
    "q",
    "steps",
    "lr",
    "max_tokens",
    "skip_first",
    "batch_size",
    "seed",
)


def vector_file(out: str | Path, i: int) -> Path:
    return Path(out) / f"vector_{i:02d}.safetensors"


def train_settings(cfg: MelboConfig, ids: list[list[int]]) -> dict[str, Any]:
    """What a trained vector depends on: the training options and the prompts' tokens."""
    d: dict[str, Any] = {k: getattr(cfg, k) for k in TRAIN_FIELDS}
    d["prompts_sha256"] = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
    return d


def save_vector(
    out: str | Path, i: int, theta: torch.Tensor, curve: list[float], settings: dict, lm
) -> Path:
    """vector_NN.safetensors: a VectorSet {source_hook: theta} with its curve and settings."""
    vs = VectorSet.for_model(
        lm,
        {settings["source_hook"]: theta},
        method="melbo",
        melbo={"index": i, "curve": curve, "settings": settings},
    )
    return vs.save(vector_file(out, i))


def load_done(
    out: str | Path, settings: dict, lm: LoadedModel
) -> list[tuple[torch.Tensor, list[float]]]:
    """The vectors 0, 1, ... already in `out` (stopping at the first missing one), after
    checking they were trained with these settings."""
    done = []
    i = 0
    while vector_file(out, i).exists():
        vs = VectorSet.load(vector_file(out, i), model=lm)
        meta = vs.metadata.get("melbo", {})
        if meta.get("settings") != settings:
            have = meta.get("settings") or {}
            diff = sorted(k for k in settings if have.get(k) != settings[k])
            raise MelboError(
                f"{vector_file(out, i)} was trained with other settings ({', '.join(diff)}): "
                "use another --out folder, or delete its vector_*.safetensors to train again."
            )
        done.append((vs[settings["source_hook"]].float(), list(meta["curve"])))
        i += 1
    return done


@dataclass
class MelboResult:
    """N MELBO vectors [N, d] at source_hook and what training them gave."""

    source_hook: str
    target_hook: str
    radius: float
    norm: str
    vectors: torch.Tensor  # [N, d] float32
    curves: list[list[float]]  # the objective before each step and after the last, per vector
    base_norm: float = 0.0  # mean ||Z(0)|| over the prompts' real positions at target_hook
    n_prompts: int = 0
    n_tokens: int = 0
    provenance: dict = field(default_factory=dict)
    gaussian: Gaussian | None = None  # the whitening, for norm "whitened"

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def vector_set(self, i: int) -> VectorSet:
        """Vector i as a VectorSet {source_hook: theta_i} (steer with coeff 1)."""
        return VectorSet(
            {self.source_hook: self.vectors[i]},
            {"method": "melbo", "melbo_index": i, "radius": self.radius, "norm": self.norm},
        )

    def summary(self) -> dict[str, Any]:
        """JSON-able: everything but the vectors themselves."""
        return {
            "source_hook": self.source_hook,
            "target_hook": self.target_hook,
            "radius": self.radius,
            "norm": self.norm,
            "n_vectors": len(self),
            "d": int(self.vectors.shape[1]),
            "base_norm": self.base_norm,
            "n_prompts": self.n_prompts,
            "n_tokens": self.n_tokens,
            "objective": [
                {"vector": i, "first": c[0], "last": c[-1], "gain": c[-1] / c[0] if c[0] else None}
                for i, c in enumerate(self.curves)
            ],
            "curves": self.curves,
            "provenance": self.provenance,
        }
