"""The two sides of `steerdiff fuzz`: a model spec -> a variant of the one loaded base model.

    "base"                              the model as loaded
    runs/owl/vectors.safetensors@2.0    base + 2.0 x a VectorSet at every position
                                        (no @: the --coeff-a/--coeff-b option, default 1.0)
    runs/lora                           a PEFT adapter folder (adapter_config.json)
    runs/finetuned                      a finetuned model folder (config.json)

Both sides are variants of the same weights (interpret.variants: base_context,
vector_context, resolve_finetune), entered one at a time, never together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SteerdiffError
from ..interpret.variants import (
    ModelContext,
    base_context,
    is_adapter_folder,
    resolve_finetune,
    vector_context,
)
from ..models import LoadedModel
from ..vectors import VectorSet

SPEC_HELP = (
    "'base', a VectorSet file (.safetensors, optionally @COEFF), a PEFT adapter folder or a "
    "finetuned model folder"
)


class ModelSpecError(SteerdiffError, ValueError):
    """A model spec that is none of the kinds `steerdiff fuzz` takes; the message says which."""


@dataclass
class Variant:
    """One side of a comparison: how to switch it on, and what it is."""

    spec: str
    kind: str  # "base", "vectors", "adapter" or "model"
    context: ModelContext
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, **self.info}


def split_coeff(spec: str, coeff: float | None) -> tuple[str, float | None]:
    """'file.safetensors@2.0' -> ('file.safetensors', 2.0); without '@' the given coeff."""
    path, at, tail = spec.rpartition("@")
    if not at:
        return spec, coeff
    try:
        value = float(tail)
    except ValueError:
        raise ModelSpecError(
            f"Model spec {spec!r}: {tail!r} after '@' is not a number; write FILE@COEFF, "
            "e.g. vectors.safetensors@2.0."
        ) from None
    if coeff is not None and coeff != value:
        raise ModelSpecError(
            f"Model spec {spec!r} gives coeff {value} but the coeff option gives {coeff}; "
            "give one of them."
        )
    return path, value


def spec_kind(spec: str, coeff: float | None = None) -> tuple[str, Path | None, float | None]:
    """(kind, path, coeff) of a spec without loading anything, so a bad spec fails before
    the model loads: kind "base", "vectors" or "folder" (an adapter or a model folder)."""
    if spec == "base":
        if coeff is not None:
            raise ModelSpecError("A coeff was given for 'base'; a coeff applies to a VectorSet.")
        return "base", None, None
    path, c = split_coeff(spec, coeff)
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        return "vectors", p, 1.0 if c is None else c
    if c is not None:
        raise ModelSpecError(
            f"Model spec {spec!r} has a coeff but {path} is not a VectorSet file (.safetensors)."
        )
    if p.is_dir() and (is_adapter_folder(p) or (p / "config.json").is_file()):
        return "folder", p, None
    problem = "does not exist" if not p.exists() else "is not any of the kinds taken"
    raise ModelSpecError(
        f"Model spec {spec!r}: {path} {problem}; pass {SPEC_HELP} (with adapter_config.json "
        "or config.json)."
    )


def resolve_variant(lm: LoadedModel, spec: str, coeff: float | None = None) -> Variant:
    """The variant of `lm` that `spec` names (see the module docstring); a spec that is none
    of them, or a VectorSet of another model, is one ModelSpecError/VectorSetError line."""
    kind, p, c = spec_kind(spec, coeff)
    if kind == "base":
        return Variant(spec, "base", lambda: base_context(lm))
    assert p is not None
    if kind == "vectors":
        vs = VectorSet.load(p, lm)
        info = {"path": str(p), "coeff": c, "hooks": list(vs), "method": vs.metadata.get("method")}
        return Variant(spec, "vectors", vector_context(lm, vs, c or 1.0), info)
    ft = resolve_finetune(lm, p)
    return Variant(spec, ft.kind, ft.context, {"path": str(p)})
