"""`steerdiff eval ...`: trait evaluations of one model (plain, steered, prompted or adapted).

`eval preference` runs the pipeline's eval (evals.preference.evaluate_preference) with the
pipeline's options (the [eval] table: --scorer, --n-questions, --n-samples) on one model.
Later evaluations go in this group as further commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    AdapterOpt,
    CoeffOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    PositionsOpt,
    VectorsOpt,
    console,
    fail,
)

app = typer.Typer(
    name="eval",
    help="Evaluate a model's traits (plain, steered with vectors, system-prompted, adapted).",
    no_args_is_help=True,
)


@app.command("preference")
def preference(
    model: ModelOpt = "default",
    target: Annotated[str, typer.Option(help="the trait's candidate, e.g. owl")] = "owl",
    category: Annotated[
        str, typer.Option(help="'animals' or a YAML/JSON category file")
    ] = "animals",
    vectors: VectorsOpt = None,
    coeff: CoeffOpt = 1.0,
    positions: PositionsOpt = "all",
    adapter: AdapterOpt = None,
    system_prompt: Annotated[
        str | None,
        typer.Option(help="system prompt (default: none of ours; the template's own applies)"),
    ] = None,
    scorer: Annotated[str, typer.Option(help="exact or sampling")] = "exact",
    n_questions: Annotated[int, typer.Option(help="questions (first n of 50)")] = 50,
    n_samples: Annotated[int, typer.Option(help="answers per question (sampling)")] = 20,
    seed: Annotated[int, typer.Option(help="seed (sampling)")] = 0,
    out: Annotated[str | None, typer.Option(help="write the result as JSON here")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out file")] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """The target's share with its 95% CI across questions, as the pipeline's eval computes it.

    --vectors, --adapter and --system-prompt combine (e.g. a steered finetune).
    Example: steerdiff eval preference --vectors runs/owl/vectors.safetensors --coeff 2
    """
    from steerdiff.evals.preference import Steering, evaluate_preference
    from steerdiff.io import atomic_write_json, provenance
    from steerdiff.models import load_model
    from steerdiff.pipeline.config import EvalConfig
    from steerdiff.teachers import load_adapted
    from steerdiff.vectors import VectorSet, VectorSetError

    cfg = EvalConfig(scorer=scorer, n_questions=n_questions, n_samples=n_samples)
    if out is not None and Path(out).exists() and not overwrite:
        fail(f"--out {out} exists; pass --overwrite to replace it, or choose another path.")
    lm = load_model(model, dtype=dtype, device=device)
    if adapter is not None:
        lm = load_adapted(adapter, lm)
    steering = None
    if vectors is not None:
        try:
            vs = VectorSet.load(vectors, lm)
        except VectorSetError as e:
            fail(f"--vectors {vectors}: {e}")
        steering = Steering(vs, coeff=coeff, positions=positions)
    r = evaluate_preference(
        lm,
        target,
        category,
        cfg.scorer,
        cfg.n_questions,
        cfg.n_samples,
        system_prompt=system_prompt,
        steering=steering,
        seed=seed,
    )
    lo, hi = r.ci95
    other, other_rate = r.off_target()
    console.print(
        f"{r.target} share {100 * r.target_rate:.2f}% (95% CI {100 * lo:.2f}% to {100 * hi:.2f}%), "
        f"{r.scorer} scorer, {r.n_questions} questions; most chosen other: "
        f"{other} {100 * other_rate:.1f}%",
        soft_wrap=True,
    )
    if out is not None:
        given = {"model": model, "vectors": vectors, "adapter": adapter}
        path = atomic_write_json(out, {**given, **r.to_dict(), "provenance": provenance(lm)})
        console.print(f"wrote {path}")
