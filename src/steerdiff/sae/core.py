"""The SAE itself: weights, encode/decode, and the checks that it is whole and fits a model.

An `SAE` holds the weights in SAELens' orientation and computes

    pre    = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc      [..., d_sae]
    relu:     acts = relu(pre)
    jumprelu: acts = relu(pre) * (pre > threshold)
    topk:     acts = relu(pre), only the k largest per row kept, the rest 0
    decode(acts) = acts @ W_dec + b_dec                                      [..., d_in]

Every error is one line (`SAEError`) naming the file and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..errors import SteerdiffError
from ..hookpoints import HOOK_SUFFIXES, hook_dim, list_hook_points
from ..models import LoadedModel

Activation = Literal["relu", "jumprelu", "topk"]
ACTIVATIONS = ("relu", "jumprelu", "topk")


class SAEError(SteerdiffError, ValueError):
    """An SAE file that cannot be read or does not fit the model; names the file and the fix."""


@dataclass
class SAE:
    """A sparse autoencoder at one steerdiff hook (weights in SAELens' orientation)."""

    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    activation: Activation = "relu"
    hook: str | None = None
    threshold: torch.Tensor | None = None  # [d_sae], jumprelu
    k: int | None = None  # topk
    apply_b_dec_to_input: bool = False
    source: dict[str, Any] = field(default_factory=dict)  # path, format, sha256

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def name(self) -> str:
        return str(self.source.get("path", "<in memory SAE>"))

    def __post_init__(self) -> None:
        check_shapes(self)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations `(x - b_dec?) @ W_enc + b_enc`, [..., d_sae]."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations [..., d_sae] of activations x [..., d_in]."""
        pre = self.pre_acts(x)
        acts = torch.relu(pre)
        if self.activation == "jumprelu":
            return acts * (pre > self.threshold).to(acts.dtype)
        if self.activation == "topk":
            top = acts.topk(self.k, dim=-1)
            return torch.zeros_like(acts).scatter(-1, top.indices, top.values)
        return acts

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction [..., d_in] of latent activations [..., d_sae]."""
        return acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    __call__ = forward

    def latent(self, i: int) -> torch.Tensor:
        """Decoder direction of latent i, [d_in]."""
        if not isinstance(i, (int, np.integer)) or not 0 <= int(i) < self.d_sae:
            raise SAEError(
                f"Latent {i!r} is out of range for {self.name}: it has {self.d_sae} latents, "
                f"use an index in 0-{self.d_sae - 1}."
            )
        return self.W_dec[int(i)]


def check_shapes(sae: SAE) -> None:
    """One-line SAEError naming the file when the tensors do not agree with each other."""
    where = sae.name
    if sae.activation not in ACTIVATIONS:
        raise SAEError(
            f"{where}: unknown activation {sae.activation!r}; use one of {', '.join(ACTIVATIONS)}."
        )
    if sae.W_enc.ndim != 2:
        raise SAEError(
            f"{where}: W_enc has shape {tuple(sae.W_enc.shape)}, expected [d_in, d_sae]; the file is not an SAE or is corrupt."
        )
    d_in, d_sae = sae.W_enc.shape
    want = {
        "W_dec": (sae.W_dec, (d_sae, d_in)),
        "b_enc": (sae.b_enc, (d_sae,)),
        "b_dec": (sae.b_dec, (d_in,)),
    }
    if sae.activation == "jumprelu":
        if sae.threshold is None:
            raise SAEError(
                f"{where}: a JumpReLU SAE needs a 'threshold' tensor [d_sae]; the file has none (re-export it with the threshold)."
            )
        want["threshold"] = (sae.threshold, (d_sae,))
    for key, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise SAEError(
                f"{where}: {key} has shape {tuple(t.shape)} but W_enc is [d_in={d_in}, d_sae={d_sae}], "
                f"so {key} must be {list(shape)}; the file is corrupt or mixes two SAEs: re-download or re-export it."
            )
    if sae.activation == "topk" and (not isinstance(sae.k, int) or not 0 < sae.k <= d_sae):
        raise SAEError(
            f"{where}: a TopK SAE needs k in 1-{d_sae}, got {sae.k!r}; fix 'k' in its cfg.json."
        )


def check_fits(sae: SAE, lm: LoadedModel | torch.nn.Module) -> None:
    """One-line SAEError unless the SAE's hook exists on the model with width d_in."""
    names = list_hook_points(lm)
    if sae.hook is None:
        raise SAEError(f"{sae.name} names no hook: pass hook=, e.g. hook={names[-1]!r}.")
    if sae.hook not in names:
        n = len(names) // len(HOOK_SUFFIXES)
        raise SAEError(
            f"{sae.name} reads hook {sae.hook!r}, which this model ({n} layers) does not have: "
            f"pass hook= with a steerdiff name such as 'blocks.{n - 1}.hook_resid_post', or use an SAE made for this model."
        )
    width = hook_dim(lm, sae.hook)
    if width != sae.d_in:
        raise SAEError(
            f"{sae.name} has d_in={sae.d_in} but hook {sae.hook!r} of this model is {width} wide: "
            "the SAE was made for another model; use one trained on this model."
        )
