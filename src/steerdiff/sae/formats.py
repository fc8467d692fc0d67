"""Reading (and writing) SAE files: the three formats researchers publish.

An `SAE` (steerdiff.sae.core) holds the weights in SAELens' orientation and computes

    pre    = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc      [..., d_sae]
    relu:     acts = relu(pre)
    jumprelu: acts = relu(pre) * (pre > threshold)
    topk:     acts = relu(pre), only the k largest per row kept, the rest 0
    decode(acts) = acts @ W_dec + b_dec                                      [..., d_in]

`load_sae(path, lm=None, hook=None)` detects the format:

- SAELens: a folder with `cfg.json` (d_in, d_sae, hook_name, architecture
  "standard" | "jumprelu" | "topk", or older `activation_fn_str` "relu" / "topk" with
  `activation_fn_kwargs: {"k": ..}`; apply_b_dec_to_input) and `sae_weights.safetensors`
  (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec, threshold for JumpReLU). Read
  from jbloomAus/SAELens sae_lens/saes/sae.py (`process_sae_in`: `sae_in - b_dec *
  apply_b_dec_to_input`) and sae_lens/saes/jumprelu_sae.py (`encode`: `activation_fn(pre) *
  (pre > threshold)`).
- Gemma Scope: `params.npz` (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec,
  threshold), JumpReLU on the raw input (no b_dec subtraction, as in the Gemma Scope
  tutorial's `JumpReLUSAE.encode`); the file names no hook, so `hook=` is required.
- EleutherAI sparsify: a folder with `cfg.json` (k, num_latents or expansion_factor, d_in,
  optional transcode) and `sae.safetensors` (encoder.weight [d_sae, d_in], encoder.bias,
  W_dec [d_sae, d_in], b_dec). Read from EleutherAI/sparsify sparsify/sparse_coder.py
  (`encode`: `if not cfg.transcode: x = x - self.b_dec`; `decode`: `... + self.b_dec`;
  `num_latents = cfg.num_latents or d_in * cfg.expansion_factor`) and
  sparsify/fused_encoder.py (`relu(linear(x))`, then `topk(k)`). So a sparsify SAE
  subtracts b_dec before encoding unless it is a transcoder. Its folder is named after the
  module it reads ("layers.8" = the output of block 8 = blocks.8.hook_resid_post).

Every error is one line (`SAEError`) naming the file and the fix. Training, steering with a
latent and reading vectors in latent space are not here yet (issue 15 continues).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import FileFormatError, atomic_path, atomic_write_json, file_sha256, read_json
from ..models import LoadedModel
from .core import SAE, Activation, SAEError, check_fits
from .hub import download_sae, is_hub_spec

# --- reading files ---------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise SAEError(
            f"{path} is missing: an SAE folder of this format needs it next to cfg.json."
        )
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers / short files
        raise SAEError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}): "
            "re-download or re-export it."
        ) from None


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path) as z:
            return {k: torch.from_numpy(np.array(z[k], dtype=np.float32)) for k in z.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as e:
        raise SAEError(
            f"{path} is truncated or corrupt ({type(e).__name__}): re-download it "
            "(Gemma Scope params.npz holds W_enc, W_dec, b_enc, b_dec, threshold)."
        ) from None


def _read_cfg(path: Path) -> dict:
    try:
        cfg = read_json(path)
    except FileFormatError as e:
        raise SAEError(str(e)) from None
    if not isinstance(cfg, dict):
        raise SAEError(
            f"{path} is not a JSON object: it must map SAE settings (d_in, ...) to values."
        )
    return cfg


def _need(tensors: dict, keys: tuple[str, ...], path: Path) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise SAEError(
            f"{path} lacks {', '.join(missing)} (has {', '.join(sorted(tensors)) or 'nothing'}): "
            "it is not an SAE of this format or is corrupt; re-download or re-export it."
        )


def _source(weights: Path, fmt: str) -> dict[str, Any]:
    return {"path": str(weights), "format": fmt, "sha256": file_sha256(weights)}


def _saelens_activation(cfg: dict, path: Path) -> tuple[Activation, int | None]:
    arch = cfg.get("architecture")
    fn = cfg.get("activation_fn_str") or cfg.get("activation_fn")
    if arch in ("jumprelu",) or fn == "jumprelu":
        return "jumprelu", None
    if arch == "topk" or fn == "topk":
        kwargs = cfg.get("activation_fn_kwargs") or {}
        k = cfg.get("k", kwargs.get("k"))
        return "topk", k
    if arch in (None, "standard") and fn in (None, "relu"):
        return "relu", None
    raise SAEError(
        f"{path}: SAE architecture {arch!r} / activation {fn!r} is not supported; "
        "steerdiff reads standard (relu), jumprelu and topk SAEs."
    )


def load_saelens(folder: Path, hook: str | None = None) -> SAE:
    cfg_path = folder / "cfg.json"
    weights = folder / "sae_weights.safetensors"
    cfg = _read_cfg(cfg_path)
    t = _read_safetensors(weights)
    _need(t, ("W_enc", "W_dec", "b_enc", "b_dec"), weights)
    activation, k = _saelens_activation(cfg, cfg_path)
    sae = SAE(
        W_enc=t["W_enc"].float(),
        b_enc=t["b_enc"].float(),
        W_dec=t["W_dec"].float(),
        b_dec=t["b_dec"].float(),
        activation=activation,
        hook=hook or cfg.get("hook_name"),
        threshold=t["threshold"].float() if "threshold" in t else None,
        k=k,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)),
        source=_source(weights, "saelens"),
    )
    _check_cfg_widths(sae, cfg, cfg_path, ("d_in", "d_sae"))
    return sae


def load_gemma_scope(npz: Path, hook: str | None = None) -> SAE:
    t = _read_npz(npz)
    _need(t, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), npz)
    if hook is None:
        raise SAEError(
            f"{npz} (Gemma Scope) does not say which hook it reads: pass hook=, e.g. "
            "hook='blocks.20.hook_resid_post' for a gemma-scope-*-res .../layer_20/... file."
        )
    return SAE(
        W_enc=t["W_enc"],
        b_enc=t["b_enc"],
        W_dec=t["W_dec"],
        b_dec=t["b_dec"],
        activation="jumprelu",
        hook=hook,
        threshold=t["threshold"],
        source=_source(npz, "gemma_scope"),
    )


_SPARSIFY_LAYER = re.compile(r"^(?:model\.)?(?:layers|h|transformer\.h)\.(\d+)$")


def load_sparsify(folder: Path, hook: str | None = None) -> SAE:
    cfg_path = folder / "cfg.json"
    weights = folder / "sae.safetensors"
    cfg = _read_cfg(cfg_path)
    t = _read_safetensors(weights)
    _need(t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), weights)
    if hook is None and (m := _SPARSIFY_LAYER.match(folder.name)):
        hook = f"blocks.{m.group(1)}.hook_resid_post"
    sae = SAE(
        W_enc=t["encoder.weight"].float().T.contiguous(),
        b_enc=t["encoder.bias"].float(),
        W_dec=t["W_dec"].float(),
        b_dec=t["b_dec"].float(),
        activation="topk",
        hook=hook,
        k=cfg.get("k"),
        apply_b_dec_to_input=not cfg.get("transcode", False),
        source=_source(weights, "sparsify"),
    )
    d_in = cfg.get("d_in")
    d_sae = cfg.get("num_latents") or (
        d_in * cfg["expansion_factor"] if d_in and cfg.get("expansion_factor") else None
    )
    _check_cfg_widths(sae, {"d_in": d_in, "d_sae": d_sae}, cfg_path, ("d_in", "d_sae"))
    return sae


def _check_cfg_widths(sae: SAE, cfg: dict, cfg_path: Path, keys: tuple[str, ...]) -> None:
    for key in keys:
        want = cfg.get(key)
        have = getattr(sae, key)
        if want is not None and want != have:
            raise SAEError(
                f"{cfg_path} says {key}={want} but {sae.name} holds {key}={have}: the config and "
                "the weights belong to different SAEs; re-download or re-export the folder."
            )


def detect_format(path: Path) -> str:
    """'saelens', 'gemma_scope' or 'sparsify' for a file or folder; SAEError otherwise."""
    if path.is_file():
        if path.suffix == ".npz":
            return "gemma_scope"
        if path.name in ("sae_weights.safetensors", "sae.safetensors", "cfg.json"):
            return detect_format(path.parent)
    elif path.is_dir():
        if (path / "sae_weights.safetensors").exists():
            return "saelens"
        if (path / "sae.safetensors").exists():
            return "sparsify"
        if (path / "params.npz").exists():
            return "gemma_scope"
    elif not path.exists():
        raise SAEError(
            f"{path} does not exist: give the SAE's folder (SAELens, sparsify) or params.npz (Gemma Scope)."
        )
    raise SAEError(
        f"{path} is not an SAE steerdiff can read: expected a folder with cfg.json + "
        "sae_weights.safetensors (SAELens) or cfg.json + sae.safetensors (sparsify), or a params.npz (Gemma Scope)."
    )


_LOADERS = {"saelens": load_saelens, "gemma_scope": load_gemma_scope, "sparsify": load_sparsify}


def load_sae(
    path: str | Path, lm: LoadedModel | torch.nn.Module | None = None, hook: str | None = None
) -> SAE:
    """Load an SAE from a SAELens folder, a Gemma Scope params.npz or a sparsify folder,
    or from the Hugging Face hub: "hf:ORG/REPO[/FOLDER/IN/REPO]" (steerdiff.sae.hub).

    `hook` overrides (or, for Gemma Scope, supplies) the steerdiff hook name the SAE reads.
    With `lm`, the hook must exist on the model and its width must equal the SAE's d_in.
    """
    if isinstance(path, str) and is_hub_spec(path):
        path = download_sae(path)  # a local folder / params.npz, or one-line SAEError
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "gemma_scope" and path.is_dir():
        path = path / "params.npz"
    elif path.is_file() and fmt != "gemma_scope":
        path = path.parent
    sae = _LOADERS[fmt](path, hook)
    if lm is not None:
        check_fits(sae, lm)
    return sae


_ARCHITECTURE = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}


def save_sae(sae: SAE, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `sae` as a SAELens folder (cfg.json + sae_weights.safetensors), atomically.

    `extra` (e.g. {"steerdiff": provenance and training settings}) is stored in cfg.json
    next to SAELens' keys; readers ignore keys they do not know. cfg.json is written last,
    so a folder without it was interrupted before it was whole. Returns the folder.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    with atomic_path(folder / "sae_weights.safetensors") as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    cfg: dict[str, Any] = {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "hook_name": sae.hook,
        "architecture": _ARCHITECTURE[sae.activation],
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "dtype": "float32",
    }
    if sae.k is not None:
        cfg["k"] = sae.k
    atomic_write_json(folder / "cfg.json", {**cfg, **(extra or {})})
    return folder
