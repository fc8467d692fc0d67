"""Replace a hook's activation by a function of it: an SAE's reconstruction spliced into the
model (how "CE loss recovered" is measured), or zero-ablation.

    with splice(lm, sae):                       # blocks.L... activation -> sae(activation)
        loss = lm.model(ids, labels=ids).loss
    with replace_activations(lm, {"blocks.3.hook_resid_post": torch.zeros_like}):
        ...

`fn` gets the whole activation [batch, pos, dim] and returns a tensor of the same shape
(to leave some positions alone, return them unchanged). The hooks are removed when the
block ends, also after an exception. Where the value is written: at the named tensor,
except `hook_resid_mid`, which has no module of its own: its new value is written by
changing the attention output, `attn_out' = fn(resid_pre + attn_out) - resid_pre`, so the
residual after attention (what the MLP's norm and the rest of the model read) becomes
`fn(resid_mid)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ..hooks import (
    HookError,
    get_blocks,
    get_hook_point,
    get_tensor,
    input_tensor,
    replace_tensor,
    with_input,
)
from ..models import LoadedModel, unwrap
from .core import SAE, check_fits

ActFn = Callable[[torch.Tensor], torch.Tensor]


def _apply(fn: ActFn, h: torch.Tensor, sl: slice | None, name: str) -> torch.Tensor:
    part = h if sl is None else h[..., sl]
    new = fn(part)
    if new.shape != part.shape:
        raise HookError(
            f"The replacement for {name} has shape {tuple(new.shape)}, expected "
            f"{tuple(part.shape)}: the function must return a tensor shaped like its input."
        )
    new = new.to(part.dtype)
    if sl is None:
        return new
    return torch.cat([h[..., : sl.start], new, h[..., sl.stop :]], dim=-1)


def _register(model: nn.Module, name: str, fn: ActFn) -> list:
    hp = get_hook_point(model, name)
    if hp.suffix == "hook_resid_mid":
        block = get_blocks(model)[hp.layer]
        seen: dict[str, torch.Tensor] = {}

        def keep_pre(_m, args, kwargs):
            seen["pre"] = input_tensor(args, kwargs)

        def write_mid(_m, _args, output):
            out, pre = get_tensor(output), seen["pre"]
            return replace_tensor(output, _apply(fn, pre + out, None, name) - pre)

        return [
            block.register_forward_pre_hook(keep_pre, with_kwargs=True),
            hp.write_module.register_forward_hook(write_mid),
        ]
    if hp.write_on == "output":

        def out_hook(_m, _args, output):
            return replace_tensor(output, _apply(fn, get_tensor(output), hp.channel_slice, name))

        return [hp.write_module.register_forward_hook(out_hook)]

    def in_hook(_m, args, kwargs):
        new = _apply(fn, input_tensor(args, kwargs), hp.channel_slice, name)
        return with_input(args, kwargs, new)

    return [hp.write_module.register_forward_pre_hook(in_hook, with_kwargs=True)]


@contextmanager
def replace_activations(model: nn.Module | LoadedModel, fns: Mapping[str, ActFn]) -> Iterator[None]:
    """Inside the block, each hook's activation h [batch, pos, dim] becomes fns[hook](h)."""
    model = unwrap(model)
    handles: list = []
    try:
        for name, fn in fns.items():
            handles += _register(model, name, fn)
        yield
    finally:
        for handle in handles:
            handle.remove()


def reconstruction(sae: SAE, skip_first: int = 0) -> ActFn:
    """fn(h) = the SAE's reconstruction of h, in h's dtype; the first `skip_first`
    positions of every row are left as they are (the attention sink an SAE is not trained on)."""

    def fn(h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = sae(h.to(sae.W_enc.device).float()).to(device=h.device, dtype=h.dtype)
        if skip_first:
            out = torch.cat([h[:, :skip_first], out[:, skip_first:]], dim=1)
        return out

    return fn


@contextmanager
def splice(
    model: nn.Module | LoadedModel, sae: SAE | list[SAE], skip_first: int = 0
) -> Iterator[None]:
    """Inside the block, each SAE's hook carries the SAE's reconstruction of its activation
    (positions before `skip_first` untouched). The SAE must fit the model (check_fits)."""
    saes = sae if isinstance(sae, list) else [sae]
    for s in saes:
        check_fits(s, model)
    with replace_activations(model, {s.hook: reconstruction(s, skip_first) for s in saes}):
        yield
