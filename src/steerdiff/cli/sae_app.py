"""`steerdiff sae ...`: sparse autoencoders. This module holds the group and `sae info`;
`sae train` / `sae eval` live in cli/sae_train.py, `sae read` in cli/sae_read.py (each adds
its commands to this `app`)."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import DeviceOpt, DtypeOpt, console

app = typer.Typer(
    name="sae",
    help="Sparse autoencoders: inspect, train, and read vectors and finetunes in latent space.",
    no_args_is_help=True,
)

SaeArg = Annotated[
    str,
    typer.Argument(
        help="an SAE: a SAELens or sparsify folder, a Gemma Scope params.npz, or hf:ORG/REPO/FOLDER"
    ),
]
HookOpt = Annotated[
    str | None, typer.Option(help="the steerdiff hook the SAE reads (overrides its file)")
]


@app.command("info")
def info(
    sae_path: SaeArg,
    hook: HookOpt = None,
    model: Annotated[
        str | None, typer.Option("--model", help="also check the SAE fits this model")
    ] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """Print an SAE's format, widths, activation and hook (checked against --model if given)."""
    from steerdiff.sae import check_fits, load_sae

    sae = load_sae(sae_path, hook=hook)
    if model is not None:
        from steerdiff.models import load_model

        check_fits(sae, load_model(model, dtype=dtype, device=device))
    src = sae.source
    k = f", k={sae.k}" if sae.k is not None else ""
    console.print(
        f"{src.get('format')} SAE {src.get('path')}\n"
        f"  hook {sae.hook}, d_in {sae.d_in}, d_sae {sae.d_sae} "
        f"({sae.d_sae / sae.d_in:g}x), {sae.activation}{k}, "
        f"b_dec subtracted before encoding: {sae.apply_b_dec_to_input}\n"
        f"  sha256 {str(src.get('sha256', ''))[:16]}"
        + ("\n  fits the model" if model is not None else "")
    )
