"""VectorSet: hook name -> vector, with the metadata that says what made it.

Saved as safetensors (metadata as JSON in the header); residual-stream sets export
to llama.cpp's GGUF control-vector format.

A set never holds NaN or Inf: construction, save, load and the GGUF export and import
raise `NonFiniteError` (from steerdiff.hooks, the check `steer` uses) naming the hook and
the file. A vector given as a numpy array or a list of floats becomes a float32 tensor.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import SteerdiffError
from .hooks import HookError, NonFiniteError, as_vector, check_finite, get_hook_point, n_layers
from .io import atomic_path
from .models import LoadedModel, unwrap
from .version import __version__

_META_KEY = "steerdiff"

__all__ = ["NonFiniteError", "VectorSet", "VectorSetError", "model_metadata"]


class VectorSetError(SteerdiffError, ValueError):
    """A VectorSet does not fit a model, or a file is not a VectorSet."""


@dataclass
class VectorSet(Mapping[str, torch.Tensor]):
    """Hook name -> tensor [dim], plus metadata (model id, weights hash, d_model, method...)."""

    vectors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vectors = {k: as_vector(k, v) for k, v in dict(self.vectors).items()}
        check_finite(self.vectors)

    # --- mapping
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.vectors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.vectors)

    def __len__(self) -> int:
        return len(self.vectors)

    def __repr__(self) -> str:
        hooks = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in list(self.vectors.items())[:4])
        more = f", ... ({len(self)} hooks)" if len(self) > 4 else ""
        return f"VectorSet({hooks}{more}; model={self.metadata.get('model_id')})"

    # --- construction
    @classmethod
    def for_model(
        cls, model: LoadedModel | torch.nn.Module, vectors: Mapping[str, torch.Tensor], **meta: Any
    ) -> VectorSet:
        """A set stamped with the model's provenance; checks every hook and shape."""
        vs = cls(dict(vectors), {**model_metadata(model), **meta})
        vs.check_fits(model)
        return vs

    # --- arithmetic (metadata of the left operand is kept, with the op noted)
    def _binary(self, other: Mapping[str, torch.Tensor], sign: float, op: str) -> VectorSet:
        if set(self) != set(other):
            missing = sorted(set(self) ^ set(other))
            raise VectorSetError(f"Cannot {op} VectorSets with different hooks: {missing[:6]}")
        out = {k: self[k] + sign * other[k].to(self[k]) for k in self}
        return VectorSet(out, {**self.metadata, "derived": f"{op} of two sets"})

    def __add__(self, other: Mapping[str, torch.Tensor]) -> VectorSet:
        return self._binary(other, 1.0, "sum")

    def __sub__(self, other: Mapping[str, torch.Tensor]) -> VectorSet:
        return self._binary(other, -1.0, "difference")

    def __mul__(self, c: float) -> VectorSet:
        return VectorSet({k: v * c for k, v in self.items()}, {**self.metadata})

    __rmul__ = __mul__

    def __neg__(self) -> VectorSet:
        return self * -1.0

    def normalized(self, norm: float = 1.0) -> VectorSet:
        """Each vector rescaled to the given L2 norm."""
        return VectorSet(
            {k: norm * v / v.norm().clamp_min(1e-12) for k, v in self.items()}, {**self.metadata}
        )

    def norms(self) -> dict[str, float]:
        return {k: float(v.norm()) for k, v in self.items()}

    def cosine(self, other: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Per-hook cosine similarity over the hooks both sets have."""
        common = [k for k in self if k in other]
        if not common:
            raise VectorSetError("The two VectorSets share no hook points.")
        return {
            k: float(
                torch.nn.functional.cosine_similarity(
                    self[k].float(), other[k].float().to(self[k].device), dim=0
                )
            )
            for k in common
        }

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        return VectorSet(
            {k: v.to(device=device, dtype=dtype) for k, v in self.items()}, {**self.metadata}
        )

    # --- checks
    def check_fits(self, model: LoadedModel | torch.nn.Module) -> None:
        """Raise VectorSetError saying which hook is missing or which shape is wrong."""
        hf = unwrap(model)
        d_model = hf.config.hidden_size
        want = self.metadata.get("d_model")
        if want is not None and int(want) != d_model:
            raise VectorSetError(
                f"This VectorSet was made for d_model={want} (model {self.metadata.get('model_id')!r}) "
                f"but the model has d_model={d_model}; load it onto the model it was made for."
            )
        for name, v in self.items():
            try:
                hp = get_hook_point(hf, name)
            except HookError as e:
                raise VectorSetError(
                    f"VectorSet hook {name!r} does not exist on this model: {e}"
                ) from e
            if tuple(v.shape) != (hp.dim,):
                raise VectorSetError(
                    f"VectorSet vector {name!r} has shape {tuple(v.shape)}, expected ({hp.dim},) "
                    f"on this model; the set was made for {self.metadata.get('model_id')!r}."
                )

    # --- io
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically as safetensors; metadata goes in the header as JSON."""
        path = Path(path)
        check_finite(self.vectors, f" to be saved to {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"steerdiff_version": __version__, **self.metadata}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta, default=str)})
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: LoadedModel | torch.nn.Module | None = None
    ) -> VectorSet:
        """Read a VectorSet; if a model is given, check it fits (hooks and shapes)."""
        path = Path(path)
        if not path.exists():
            raise VectorSetError(f"VectorSet file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                vectors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise VectorSetError(
                f"{path} is not a readable safetensors file ({_one_line(e)}); a file cut short "
                "by an interrupted copy or write: copy it again, or save/fit the set again."
            ) from e
        check_finite(vectors, f" in {path}")
        vs = cls(vectors, _header_metadata(path, header))
        if model is not None:
            vs.check_fits(model)
        return vs

    # --- llama.cpp
    def to_gguf_control_vector(
        self, path: str | os.PathLike, model_hint: str | None = None
    ) -> Path:
        """Export residual-stream vectors as a llama.cpp control vector (GGUF).

        llama.cpp adds `direction.{l}` to the output of (0-based) layer l, i.e.
        `blocks.{l}.hook_resid_post`, for l >= 1. `blocks.{l}.hook_resid_pre` is the same
        point as `blocks.{l-1}.hook_resid_post` and is exported as such. Other hooks
        (q/k/v, norms, attention/MLP outputs) cannot be expressed and raise an error.
        """
        import gguf

        check_finite(self.vectors, f" to be exported to {path}")
        layers: dict[int, torch.Tensor] = {}
        for name, v in self.items():
            m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", name)
            if not m:
                raise VectorSetError(
                    f"{name} is not a residual-stream hook; llama.cpp control vectors only "
                    "hold vectors added to block outputs (hook_resid_post / hook_resid_pre)."
                )
            layer = int(m.group(1)) - (1 if m.group(2) == "pre" else 0)
            if layer < 1:
                raise VectorSetError(
                    f"{name} would be llama.cpp layer {layer}; llama.cpp cannot steer before "
                    "the output of layer 1 (blocks.1.hook_resid_post / blocks.2.hook_resid_pre)."
                )
            layers[layer] = layers.get(layer, 0) + v.detach().float().cpu()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        hint = model_hint or str(
            self.metadata.get("model_type") or self.metadata.get("model_id", "")
        )
        with atomic_path(path) as tmp:
            writer = gguf.GGUFWriter(str(tmp), "controlvector")
            writer.add_string("controlvector.model_hint", hint)
            writer.add_uint32("controlvector.layer_count", len(layers))
            for layer in sorted(layers):
                writer.add_tensor(f"direction.{layer}", layers[layer].numpy())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        return path

    @classmethod
    def from_gguf_control_vector(cls, path: str | os.PathLike) -> VectorSet:
        """Read a llama.cpp control vector back as `blocks.{l}.hook_resid_post` vectors."""
        import gguf

        path = Path(path)
        if not path.exists():
            raise VectorSetError(f"Control-vector file not found: {path}")
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as e:
            raise VectorSetError(
                f"{path} is not a readable GGUF file ({_one_line(e)}); export it again with "
                "VectorSet.to_gguf_control_vector."
            ) from e
        arch = _gguf_str(reader, "general.architecture")
        if arch != "controlvector":
            raise VectorSetError(f"{path} has architecture {arch!r}, not 'controlvector'.")
        vectors = {}
        for t in reader.tensors:
            m = re.fullmatch(r"direction\.(\d+)", t.name)
            if m:
                vectors[f"blocks.{m.group(1)}.hook_resid_post"] = torch.tensor(t.data.copy())
        check_finite(vectors, f" in {path}")
        meta = {"model_hint": _gguf_str(reader, "controlvector.model_hint"), "source": str(path)}
        return cls(vectors, meta)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _header_metadata(path: Path, header: Mapping[str, str]) -> dict[str, Any]:
    """The set's metadata from a safetensors header; a broken entry names the file and fix."""
    if _META_KEY not in header:
        return {}
    try:
        meta = json.loads(header[_META_KEY])
    except json.JSONDecodeError as e:
        raise VectorSetError(
            f"{path}: the '{_META_KEY}' metadata in its safetensors header is not valid JSON "
            f"({e}). Save the set again (VectorSet.save), or rewrite that header entry as a "
            "JSON object."
        ) from e
    if not isinstance(meta, dict):
        raise VectorSetError(
            f"{path}: the '{_META_KEY}' metadata in its safetensors header is a "
            f"{type(meta).__name__}, not a JSON object. Save the set again (VectorSet.save), "
            "or rewrite that header entry as a JSON object."
        )
    return meta


def _gguf_str(reader: Any, key: str) -> str | None:
    f = reader.fields.get(key)
    if f is None:
        return None
    return bytes(f.parts[f.data[0]]).decode()


def model_metadata(model: LoadedModel | torch.nn.Module) -> dict[str, Any]:
    """Provenance of a model for VectorSet metadata."""
    hf = unwrap(model)
    meta: dict[str, Any] = {
        "d_model": hf.config.hidden_size,
        "n_layers": n_layers(hf),
        "model_type": hf.config.model_type,
        "steerdiff_version": __version__,
    }
    if isinstance(model, LoadedModel):
        meta.update(model_id=model.spec, weights_hash=model.weights_hash)
    return meta
