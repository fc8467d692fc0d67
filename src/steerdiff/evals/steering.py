"""The steering an evaluation runs under: vectors, coefficients, positions.

`Steering` describes it; `steered_phase` applies it to one phase (prompt or response)
of a cached teacher-forced pass, `steered` to a whole generation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch

from ..errors import SteerdiffError
from ..hooks import Op, Positions, parse_positions, steer
from ..models import LoadedModel
from ..vectors import VectorSet
from ..whiten import Gaussian, whitened_units


class SteeringError(SteerdiffError, ValueError):
    """Steering that an evaluation cannot apply; the message says what to change."""


@dataclass
class Steering:
    """An optional steering context for an evaluation (see hooks.steer)."""

    vectors: Mapping[str, torch.Tensor]
    coeff: float | Sequence[float] = 1.0  # a list: evaluate under each coefficient, batched
    positions: Positions = "all"
    op: Op = "add"
    units: str = "l2"  # "whitened": the vectors are at 1 whitened unit (see in_whitened_units)

    def in_whitened_units(self, gaussians: Mapping[str, Gaussian]) -> Steering:
        """The same steering with coeff in whitened units: each vector rescaled to Mahalanobis
        norm 1 under its hook's Gaussian (steerdiff.whiten.whitened_units), so coeff c moves
        the activations by c standard deviations of the data along the vector."""
        if self.units == "whitened":
            return self
        vecs = whitened_units(self.vectors, gaussians)
        meta = {**getattr(self.vectors, "metadata", {}), "coeff_units": "whitened"}
        return replace(self, vectors=VectorSet(vecs, meta), units="whitened")

    @property
    def coeffs(self) -> list[float]:
        return (
            [float(c) for c in self.coeff]
            if isinstance(self.coeff, Sequence)
            else [float(self.coeff)]
        )

    def describe(self) -> dict:
        meta = getattr(self.vectors, "metadata", {})
        return {
            "hooks": list(self.vectors),
            "coeff": self.coeff,
            "positions": self.positions if isinstance(self.positions, str) else "mask",
            "op": self.op,
            "units": self.units,
            "readout": meta.get("readout"),
            "method": meta.get("method"),
        }


def steered_phase(
    lm: LoadedModel, steering: Steering | None, phase: str, coeff: torch.Tensor | None
) -> AbstractContextManager:
    """Steer one phase of a cached teacher-forced pass ('prompt' or 'response'); coeff [batch]."""
    if steering is None:
        return nullcontext()
    kind, _ = parse_positions(steering.positions)
    if kind == "mask":
        raise SteeringError(
            "Cached scoring takes positions 'all', 'prompt', 'response' or 'first:k', not a mask."
        )
    if kind in ("prompt", "response"):
        if kind != phase:
            return nullcontext()
        return steer(lm.model, steering.vectors, coeff, "all", steering.op)
    return steer(lm.model, steering.vectors, coeff, steering.positions, steering.op)


@contextmanager
def steered(lm: LoadedModel, steering: Steering | None) -> Iterator[None]:
    """Steer a whole pass or generation with one coefficient (or not at all)."""
    if steering is None:
        yield
        return
    if len(steering.coeffs) != 1:
        raise SteeringError("Sampling takes one coeff; loop over coefficients.")
    with steer(lm.model, steering.vectors, steering.coeffs[0], steering.positions, steering.op):
        yield
