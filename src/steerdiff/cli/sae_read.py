"""`steerdiff sae read`: a vector set or a finetune read in an SAE's latents (decomposition,
latent effects on corpus text, per-latent dashboards), written as sae_read.json + .html."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    CorpusOpt,
    DeviceOpt,
    DtypeOpt,
    FirstKOpt,
    ModelOpt,
    TokensOpt,
    console,
    fail,
)
from .sae_app import HookOpt, SaeArg, app


@app.command("read")
def read(
    sae_path: SaeArg,
    out: Annotated[str, typer.Option("--out", help="output folder (sae_read.json, .html)")],
    vectors: Annotated[
        str | None, typer.Option("--vectors", help="VectorSet (.safetensors) added to the model")
    ] = None,
    coeff: Annotated[float, typer.Option(help="multiplier of the vectors")] = 1.0,
    adapter: Annotated[
        str | None, typer.Option("--adapter", help="PEFT (LoRA) adapter folder for --model")
    ] = None,
    finetuned: Annotated[
        str | None, typer.Option("--finetuned", help="finetuned model (hub id or folder)")
    ] = None,
    model: ModelOpt = "default",
    hook: HookOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    corpus: CorpusOpt = "default",
    n_texts: Annotated[int | None, typer.Option("--n-texts", help="texts read (seeded)")] = 500,
    tokens: TokensOpt = 64,
    first_k: FirstKOpt = 5,
    skip_first: Annotated[
        int, typer.Option(help="positions left out of the all-position means")
    ] = 1,
    batch_size: Annotated[int, typer.Option(help="texts per forward")] = 16,
    top: Annotated[int, typer.Option("--top", help="latents per table")] = 10,
    dashboards: Annotated[
        int,
        typer.Option(
            "--dashboards",
            help="dashboards of the N latents raised most and the N best by cosine (0: none)",
        ),
    ] = 5,
) -> None:
    """Read a vector set or a finetune in an SAE's latent basis.

    Example: steerdiff sae read runs/sae/blocks.24.hook_resid_post --vectors runs/owl/vectors.safetensors --out runs/owl_sae
    """
    given = [
        o
        for o, v in (("--vectors", vectors), ("--adapter", adapter), ("--finetuned", finetuned))
        if v
    ]
    if len(given) != 1:
        fail(
            "give exactly one of --vectors V.safetensors, --adapter FOLDER or --finetuned MODEL "
            f"(got {', '.join(given) or 'none'}): the change to read in the SAE's latents"
        )
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        fail(f"--adapter {adapter}: no adapter_config.json there; give a PEFT adapter folder")

    from steerdiff.interpret.sae_read import read_in_latents
    from steerdiff.io import atomic_write_json, provenance
    from steerdiff.models import load_model
    from steerdiff.report.html import write
    from steerdiff.report.sae import sae_report
    from steerdiff.sae import check_fits, load_sae
    from steerdiff.vectors import VectorSet

    lm = load_model(model, dtype=dtype, device=device)
    sae = load_sae(sae_path, lm=lm, hook=hook)
    check_fits(sae, lm)
    vs = VectorSet.load(vectors, lm) if vectors else None
    data = read_in_latents(
        lm,
        sae,
        vectors=vs,
        finetuned=adapter or finetuned,
        coeff=coeff,
        texts=corpus,
        n_texts=n_texts,
        max_tokens=tokens,
        first_k=first_k,
        skip_first=skip_first,
        batch_size=batch_size,
        top=top,
        n_dashboards=dashboards,
        progress=True,
    )
    data["change"]["source"] = vectors or adapter or finetuned
    data["provenance"] = provenance(lm)
    o = Path(out)
    atomic_write_json(o / "sae_read.json", data)
    write(sae_report(data), o / "sae_read.html")
    _print(data)
    console.print(f"wrote {o}/sae_read.json, {o}/sae_read.html")


def _print(data: dict) -> None:
    dec = data.get("decomposition")
    if dec:
        console.print(f"[bold]decomposition of the {dec['of']}[/] at {dec['hook']}")
        for r in dec["top"][:5]:
            console.print(
                f"  latent {r['latent']:>6}  cos {r['cosine']:+.3f}  W_dec v {r['pullback_dec']:+.3g}"
            )
    eff = data["effects_top"]
    console.print(f"[bold]latent effects[/] ({data['effects']['n_texts']} texts, all positions)")
    for side in ("up", "down"):
        console.print(
            f"  {side:>4}: "
            + "  ".join(f"{r['latent']} ({r['change']:+.3g})" for r in eff["all"][side][:5])
        )
