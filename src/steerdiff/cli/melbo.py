"""`steerdiff melbo`: MELBO unsupervised steering vectors (steerdiff.melbo), their radius
sweep, samples and evals, into one folder (resumable per vector)."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import DEFAULT_MODEL, DeviceOpt, DtypeOpt, ModelOpt, ThreadsOpt, console, fail

app = typer.Typer()


def _floats(spec: str | None, option: str) -> list[float]:
    if not spec:
        return []
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        fail(f"{option} {spec!r}: give comma-separated numbers, e.g. 0.5,1,2,4,8")


@app.command("melbo")
def melbo(
    out: Annotated[str, typer.Option("--out", help="the output folder (re-run it to resume)")],
    model: ModelOpt = DEFAULT_MODEL,
    source_hook: Annotated[str, typer.Option(help="where the vectors are added")] = (
        "blocks.6.hook_resid_post"
    ),
    target_hook: Annotated[str, typer.Option(help="whose change is maximised")] = (
        "blocks.20.hook_resid_post"
    ),
    n_vectors: Annotated[int, typer.Option(help="orthogonal vectors, learned in turn")] = 8,
    radius: Annotated[float, typer.Option(help="the vectors' norm R (> 0)")] = 4.0,
    norm: Annotated[str, typer.Option(help="l2 | whitened (R in the Mahalanobis norm)")] = "l2",
    whiten: Annotated[
        str | None, typer.Option(help="a Gaussian file at the source hook (norm whitened)")
    ] = None,
    whiten_texts: Annotated[int, typer.Option(help="corpus texts to fit one, if no file")] = 200,
    p: Annotated[float, typer.Option("--p", help="power on each position's ||dZ||")] = 2.0,
    q: Annotated[float | None, typer.Option("--q", help="root of each prompt's sum (p)")] = None,
    steps: Annotated[int, typer.Option(help="optimiser steps per vector")] = 100,
    lr: Annotated[float, typer.Option(help="Adam learning rate")] = 0.01,
    prompts: Annotated[
        str | None, typer.Option(help="a .txt file, one user message a line")
    ] = None,
    n_prompts: Annotated[int, typer.Option(help="prompts trained on")] = 8,
    max_tokens: Annotated[int, typer.Option(help="tokens per prompt")] = 64,
    skip_first: Annotated[
        int, typer.Option(help="first positions left out of the objective (0: as published)")
    ] = 1,
    batch_size: int = 8,
    seed: int = 0,
    radii: Annotated[
        str | None, typer.Option(help="the radius sweep, e.g. 0.5,1,2,4,8 (none by default)")
    ] = None,
    sweep_steps: Annotated[int | None, typer.Option(help="steps per sweep vector")] = None,
    n_random: Annotated[int, typer.Option(help="random vectors per radius (baseline)")] = 4,
    evals: Annotated[
        str | None, typer.Option(help="comma-separated: preference, misalignment, coherence")
    ] = None,
    target: Annotated[str, typer.Option(help="the preference eval's trait")] = "owl",
    category: str = "animals",
    n_questions: Annotated[int, typer.Option(help="preference questions")] = 20,
    n_samples: Annotated[int, typer.Option(help="neutral prompts sampled per vector")] = 3,
    sample_tokens: int = 40,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = 0,
) -> None:
    """Learn N orthogonal unsupervised steering vectors of norm R at --source-hook that most
    change --target-hook's activations (Mack & Turner 2024), then sample and evaluate each.
    Writes OUT/vector_NN.safetensors, OUT/melbo.json and OUT/melbo.png."""
    from steerdiff.melbo import MelboConfig

    cfg = MelboConfig(  # bad options fail here, in one line, before the model loads
        source_hook=source_hook, target_hook=target_hook, n_vectors=n_vectors, radius=radius,
        norm=norm, whiten=whiten, whiten_texts=whiten_texts, p=p, q=q, steps=steps, lr=lr,
        prompts=prompts, n_prompts=n_prompts, max_tokens=max_tokens, skip_first=skip_first, batch_size=batch_size,
        seed=seed, radii=_floats(radii, "--radii"), sweep_steps=sweep_steps, n_random=n_random,
        evals=evals or [], target=target, category=category, n_questions=n_questions,
        n_samples=n_samples, sample_tokens=sample_tokens,
    )  # fmt: skip
    import torch

    from steerdiff.melbo.run import JSON_FILE, PNG_FILE, run_melbo
    from steerdiff.models import load_model

    if threads:
        torch.set_num_threads(threads)
    lm = load_model(model, dtype=dtype, device=device)
    doc = run_melbo(lm, cfg, out)
    for row in doc["training"]["objective"]:
        console.print(f"vector {row['vector']}: objective {row['first']:.4g} -> {row['last']:.4g}")
    if "evals" in doc:
        console.print(f"ranked by {doc['evals']['rank_by']}: {doc['evals']['ranking']}")
    console.print(f"wrote {out}/{JSON_FILE}, {out}/{PNG_FILE} and {cfg.n_vectors} vector files")
