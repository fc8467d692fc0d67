"""TeacherConfig: the experiment file's [teacher] table (who writes a dataset), and
TeacherError. steerdiff.teachers re-exports both and turns a config into a Teacher."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from .errors import SteerdiffError
from .extract import PERSONAS, trait_system_prompt


class TeacherError(SteerdiffError, ValueError):
    """A teacher could not be built; the message says what is wrong and how to fix it."""


class TeacherConfig(BaseModel):
    """Who writes the dataset.

    kind: "steered" (base model + a contrast vector, no system prompt), "prompt" (the trait
    system prompt), "sae" (base model + coeff x an SAE latent's decoder direction at the
    SAE's hook), "adapter" (a finetuned folder / LoRA adapter), "plain" (control data).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["steered", "prompt", "sae", "adapter", "plain"] = "steered"
    animal: str = "owl"
    category: str = "animal"
    # steered teachers: the contrast vector (trait system prompt vs none)
    hook: str = "blocks.24.hook_resid_post"
    readout: Literal["last", "prompt_mean", "response_mean", "pca"] = "last"
    coeff: float = 2.0
    positions: str = "all"
    vectors: str | None = None  # use a saved VectorSet instead of extracting one
    adapter: str | None = None  # kind = "adapter": folder of a finetuned model or LoRA adapter
    system_prompt: str | None = None  # kind = "prompt": overrides the trait template
    persona: str | None = None  # kind = "prompt": a PERSONAS system prompt instead of a trait
    # kind = "prompt": project the contrast vector out of the residual stream from `hook`'s
    # layer onward while the teacher generates (the necessity check)
    ablate_from_hook: bool = False
    sae: str | None = None  # kind = "sae": the SAE (folder, params.npz or hf:ORG/REPO/FOLDER)
    latent: int | None = None  # kind = "sae": the latent whose decoder direction steers
    # steered / sae teachers: coeff in L2 units (coeff x the vector) or in whitened units
    # (coeff standard deviations of the data along the vector, steerdiff.whiten)
    coeff_units: Literal["l2", "whitened"] = "l2"
    whiten: str | None = None  # a saved Gaussian (steerdiff whiten fit); None: fit on the corpus

    @model_validator(mode="after")
    def _check(self) -> TeacherConfig:
        if self.kind == "sae" and (self.sae is None or self.latent is None):
            raise ValueError("kind 'sae' needs both sae (the SAE's path) and latent (an index)")
        if self.kind != "sae" and (self.sae is not None or self.latent is not None):
            raise ValueError(f"sae / latent are for kind = 'sae', not {self.kind!r}: drop them")
        if self.coeff_units == "whitened" and self.kind not in ("steered", "sae"):
            raise ValueError(
                f"coeff_units 'whitened' is for steered / sae teachers, not {self.kind!r}"
            )
        if self.whiten is not None and self.coeff_units != "whitened":
            raise ValueError(
                "whiten (a Gaussian file) is used with coeff_units = 'whitened': set it"
            )
        if self.persona is not None:
            persona_prompt(self.persona)  # an unknown name fails here
            if self.kind != "prompt" or self.system_prompt is not None:
                raise ValueError(
                    "persona: a persona is the system prompt of a prompt teacher: set "
                    "kind = 'prompt' and drop system_prompt (or drop persona)"
                )
        return self

    def system_prompt_text(self) -> str | None:
        """The trait system prompt: `system_prompt`, else the persona's, else the trait
        template for animal and category. A prompt teacher writes under it and a steered
        teacher's contrast vector is extracted from it; None for plain and adapter teachers."""
        if self.kind in ("plain", "adapter", "sae"):
            return None
        if self.persona is not None:
            return persona_prompt(self.persona)
        return self.system_prompt or trait_system_prompt(self.animal, self.category)

    def spec(self) -> dict[str, Any]:
        """The spec dict `build_teacher` reads. A steered teacher's vectors come from the
        `vectors` path here or from build_teacher's `vectors` argument."""
        steering: dict[str, Any] = {"coeff": self.coeff, "positions": self.positions}
        if self.coeff_units == "whitened":
            steering |= {"coeff_units": "whitened", "whiten": self.whiten}
        if self.kind == "steered":
            d: dict[str, Any] = {"kind": "steered", "animal": self.animal, **steering}
            return {**d, "vectors": self.vectors} if self.vectors else d
        if self.kind == "sae":  # the hook comes from the SAE unless set here
            hook = {"hook": self.hook} if "hook" in self.model_fields_set else {}
            return {"kind": "sae", "sae": self.sae, "latent": self.latent, **hook, **steering}
        system = {"system_prompt": self.system_prompt_text()}
        if self.kind == "prompt" and self.persona is not None:  # no animal: no trait
            return {"kind": "prompt", "persona": self.persona, **system}
        if self.kind == "prompt":
            return {"kind": "prompt", "animal": self.animal, "category": self.category, **system}
        if self.kind == "adapter":
            return {"kind": "adapter", "path": self.adapter, "animal": self.animal}
        return {"kind": "plain"}


def persona_prompt(name: str) -> str:
    """The system prompt of a persona (PERSONAS); TeacherError naming the choices."""
    if name not in PERSONAS:
        raise TeacherError(f"Unknown persona {name!r}; use one of {', '.join(PERSONAS)}.")
    return PERSONAS[name]
