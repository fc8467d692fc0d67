"""`steerdiff fuzz MODEL_A MODEL_B`: which of two variants of one model is more readily
pushed into a behaviour by activation noise."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import DeviceOpt, DtypeOpt, ModelOpt, ThreadsOpt, console

app = typer.Typer()

SPEC = "'base', a VectorSet (.safetensors, optionally @COEFF), an adapter or model folder"


def _floats(text: str, option: str) -> list[float]:
    from steerdiff.fuzz import FuzzError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FuzzError(f"{option} {text!r}: give comma-separated numbers, e.g. 0,0.5,1.") from None


@app.command("fuzz")
def fuzz(
    model_a: Annotated[str, typer.Argument(metavar="MODEL_A", help=SPEC)],
    model_b: Annotated[str, typer.Argument(metavar="MODEL_B", help=SPEC)],
    out: Annotated[str, typer.Option("--out", help="folder for fuzz.json and fuzz.png")],
    model: ModelOpt = "default",
    eval: Annotated[str, typer.Option("--eval", help="preference | misalignment")] = "preference",
    target: Annotated[str, typer.Option(help="preference: the trait's answer")] = "owl",
    category: Annotated[str, typer.Option(help="preference: the category")] = "animals",
    questions: Annotated[
        str | None, typer.Option(help="misalignment: a question bank (default: built-in)")
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(help="noise at blocks.L.hook_resid_post, e.g. 6,12,18 (default: 20/40/60%)"),
    ] = None,
    hooks: Annotated[
        str | None, typer.Option(help="noise at these hooks (comma-separated)")
    ] = None,
    scales: Annotated[str, typer.Option(help="noise scales, comma-separated")] = "0,0.25,0.5,1",
    seeds: Annotated[int, typer.Option(help="noise seeds per scale")] = 2,
    noise: Annotated[str, typer.Option(help="isotropic | whitened")] = "isotropic",
    whiten: Annotated[
        list[str] | None, typer.Option(help="whitened: a Gaussian file per hook (repeat)")
    ] = None,
    n_questions: Annotated[int | None, typer.Option(help="questions (default: 20)")] = 20,
    coeff_a: Annotated[float | None, typer.Option(help="MODEL_A's VectorSet coeff")] = None,
    coeff_b: Annotated[float | None, typer.Option(help="MODEL_B's VectorSet coeff")] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = 0,
) -> None:
    """Add Gaussian noise of increasing scale at the hooks, measure the eval for MODEL_A and
    MODEL_B (two variants of --model), and say which is more readily pushed into the
    behaviour: A - B of the eval averaged over the scales > 0, per question, with a bootstrap
    95% CI over questions. Writes OUT/fuzz.json and OUT/fuzz.png; a rerun with the same
    settings resumes from OUT/parts.

    Example: steerdiff fuzz base runs/owl/vectors.safetensors@2.0 --target owl --out fz
    """
    import torch

    from steerdiff.fuzz import FuzzConfig, resolve_variant, run_fuzz
    from steerdiff.fuzz.variants import spec_kind
    from steerdiff.io import atomic_write_json, provenance
    from steerdiff.models import load_model
    from steerdiff.report.fuzz import write_fuzz_png

    cfg = FuzzConfig(
        eval=eval,
        target=target,
        category=category,
        questions=questions,
        hooks=[h.strip() for h in hooks.split(",")] if hooks else [],
        layers=[int(x) for x in _floats(layers, "--layers")] if layers else [],
        scales=_floats(scales, "--scales"),
        seeds=seeds,
        noise=noise,
        whiten=list(whiten or []),
        n_questions=n_questions,
    )  # a bad --eval, --scales or --noise fails here, before the model loads
    spec_kind(model_a, coeff_a), spec_kind(model_b, coeff_b)  # and a bad MODEL_A / MODEL_B
    if threads > 0:
        torch.set_num_threads(threads)
    lm = load_model(model, dtype=dtype, device=device)
    label_b = model_b if model_b != model_a else f"{model_b} (B)"
    variants = {
        model_a: resolve_variant(lm, model_a, coeff_a),
        label_b: resolve_variant(lm, model_b, coeff_b),
    }
    result = run_fuzz(lm, variants, [(model_a, label_b)], cfg, Path(out))
    result["provenance"] = provenance(lm, cfg, seed=0)
    atomic_write_json(Path(out) / "fuzz.json", result)
    write_fuzz_png(result, Path(out) / "fuzz.png")
    c = result["comparisons"][0]
    console.print(f"wrote {Path(out) / 'fuzz.json'} and fuzz.png")
    typer.echo(c["sentence"])
