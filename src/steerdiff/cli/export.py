"""`steerdiff export`: a vector set as something other tools run.

--merged OUT   the base model with the vectors baked into its biases: a plain Hugging Face
               folder that vLLM (`vllm serve OUT`) or any engine runs steered (steerdiff.merge)
--gguf OUT     residual-stream vectors as a llama.cpp control vector (.gguf; no model needed)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import CoeffOpt, DeviceOpt, DtypeOpt, ModelOpt, PositionsOpt, console, fail

app = typer.Typer()


@app.command()
def export(
    vectors: Annotated[str, typer.Option("--vectors", help="the VectorSet (.safetensors)")],
    merged: Annotated[
        str | None,
        typer.Option(help="write model + vectors (as biases) to this Hugging Face folder"),
    ] = None,
    gguf: Annotated[
        str | None, typer.Option(help="write a llama.cpp control vector to this .gguf file")
    ] = None,
    model: ModelOpt = "default",
    coeff: CoeffOpt = 1.0,
    positions: PositionsOpt = "all",
    overwrite: Annotated[
        bool, typer.Option(help="replace an existing output (kept until the new one is done)")
    ] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """Export a vector set: merged into a model's biases (--merged) or as a GGUF control vector.

    Example: steerdiff export --vectors runs/owl/vectors.safetensors --coeff 2 --merged owl-2x
    then: vllm serve owl-2x
    """
    import time

    from steerdiff.merge import check_positions, export_merged
    from steerdiff.models import load_model
    from steerdiff.vectors import VectorSet

    if (merged is None) == (gguf is None):
        fail("give exactly one of --merged FOLDER (a steered model) or --gguf FILE.gguf")
    out = Path(merged or gguf)  # type: ignore[arg-type]
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        fail(f"{out} already exists; choose another path or pass --overwrite.")
    if merged is not None:
        check_positions(positions)
    vs = VectorSet.load(vectors)  # a bad file fails here, before any model loads
    if gguf is not None:
        vs = vs * coeff if coeff != 1.0 else vs
        vs.to_gguf_control_vector(out)
        console.print(f"wrote {out} ({len(vs)} layers; llama.cpp: --control-vector {out})")
        return
    t0 = time.perf_counter()
    lm = load_model(model, dtype=dtype, device=device)
    vs = VectorSet.load(vectors, lm)
    export_merged(lm, vs, out, coeff, positions, vectors_file=vectors, overwrite=overwrite)
    console.print(
        f"wrote {out}: {lm.spec} + {len(vs)} vector(s) x {coeff} as biases "
        f"({time.perf_counter() - t0:.1f} s). Serve it with: vllm serve {out}"
    )
