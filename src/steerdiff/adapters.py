"""PEFT adapter folders: was this adapter made for this base model?

    check_adapter_base(folder, model)   AdapterError in one line if not

An adapter made for another base fails in PEFT with a long size-mismatch text, or, when
the shapes happen to fit (a sibling model of the same architecture), not at all. Both
`teachers.load_adapted` and `interpret.variants.adapter_context` call this first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .errors import SteerdiffError
from .models import LoadedModel


class AdapterError(SteerdiffError, ValueError):
    """An adapter made for another base model; the message names both and the fix."""


def _name(s: object) -> str:
    """A model id or folder reduced to its last part, lowercased: 'Org/Name/' -> 'name';
    a Hugging Face cache snapshot '.../models--Org--Name/snapshots/<hash>' -> 'name'."""
    parts = str(s or "").replace("\\", "/").rstrip("/").split("/")
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].split("--")[-1].lower()
    return parts[-1].lower()


def _model_names(model: LoadedModel | nn.Module) -> set[str]:
    hf = model.model if isinstance(model, LoadedModel) else model
    names = {getattr(hf, "name_or_path", ""), getattr(hf.config, "_name_or_path", "")}
    if isinstance(model, LoadedModel):
        names |= {model.spec, model.source}
    return {_name(n) for n in names} - {""}


def _lora_shapes(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """module name -> ("A" or "B", weight shape) of each LoRA weight in the adapter file."""
    path = folder / "adapter_model.safetensors"
    if not path.exists():  # (.bin adapters: PEFT itself checks the shapes)
        return {}
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            for ab in ("A", "B"):
                tail = f".lora_{ab}.weight"
                if key.endswith(tail):
                    name = key[: -len(tail)].removeprefix("base_model.model.")
                    out[f"{name}:{ab}"] = (name, tuple(f.get_slice(key).get_shape()))
    return out


def _shape_misfit(folder: Path, hf: nn.Module) -> str | None:
    """The first LoRA weight that does not fit the model's module, described; else None."""
    modules = dict(hf.named_modules())
    for key, (name, shape) in sorted(_lora_shapes(folder).items()):
        mod = modules.get(name)
        if mod is None:
            return f"the model has no module {name}"
        w = getattr(mod, "weight", None)
        if w is None or w.dim() != 2 or len(shape) != 2:
            continue
        out_f, in_f = w.shape
        ok = shape[1] == in_f if key.endswith(":A") else shape[0] == out_f
        if not ok:
            return f"{name} is {out_f}x{in_f} here but the adapter's LoRA {key[-1]} is {shape[0]}x{shape[1]}"
    return None


def check_adapter_base(folder: str | os.PathLike, model: LoadedModel | nn.Module) -> None:
    """Raise AdapterError (one line) if the PEFT adapter in `folder` was made for another
    base model: adapter_config.json's base_model_name_or_path names another model than
    `model` (compared by the last part of the id or path), or its LoRA weights do not fit
    the model's modules. The message names the folder, both models and the fix."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return  # the loader reports an unreadable config itself
    made_for = str(cfg.get("base_model_name_or_path") or "") if isinstance(cfg, dict) else ""
    hf = model.model if isinstance(model, LoadedModel) else model
    given = model.spec if isinstance(model, LoadedModel) else (hf.name_or_path or "this model")
    have = _model_names(model)
    misfit = _shape_misfit(folder, hf)
    name_differs = bool(made_for) and bool(have) and _name(made_for) not in have
    if misfit is None and not name_differs:
        return
    why = f" ({misfit})" if misfit else ""
    made = f"made for {made_for!r}" if made_for else "made for another base model"
    fix = (
        f"give the base model it was trained on ({made_for})"
        if made_for
        else "give the base model it was trained on"
    ) + " or retrain the adapter on this model"
    if misfit is None:
        fix += (
            f"; if it was trained on these very weights, set base_model_name_or_path in "
            f"{folder / 'adapter_config.json'} to {given!r}"
        )
    raise AdapterError(
        f"The adapter {folder} was {made}, not for the model given ({given!r}){why}; "
        f"was it trained on this base model? Fix: {fix}."
    )
