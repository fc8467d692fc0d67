"""`steerdiff read faithfulness`: do the vectors do what the finetune does? (registered on
the `read` group by cli/read.py; the library is steerdiff.interpret.faithfulness and, for the
held-out loss and the task's own eval, steerdiff.fit.faithful)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import CorpusOpt, DeviceOpt, DtypeOpt, FirstKOpt, TokensOpt, console


def faithfulness_cmd(
    model: Annotated[
        str, typer.Argument(help="the base model (spec, folder or hub id)")
    ] = "default",
    vectors: Annotated[
        str | None, typer.Option("--vectors", help="VectorSet fitted to the finetune's data")
    ] = None,
    finetuned: Annotated[
        str | None,
        typer.Option("--finetuned", help="LoRA adapter folder or finetuned model (folder/spec)"),
    ] = None,
    vectors_b: Annotated[
        str | None,
        typer.Option("--vectors-b", help="a second VectorSet, compared instead of a finetune"),
    ] = None,
    out: Annotated[
        str, typer.Option("--out", help="output folder (JSON, PNG)")
    ] = "runs/read_faithfulness",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    corpus: CorpusOpt = "default",
    n_texts: Annotated[int | None, typer.Option("--n-texts", help="texts (seeded subset)")] = 200,
    tokens: TokensOpt = 64,
    first_k: FirstKOpt = 5,
    hooks: Annotated[
        str, typer.Option("--hooks", help="hooks compared per layer (glob)")
    ] = "blocks.*.hook_resid_post",
    coeff: Annotated[float, typer.Option(help="multiplier of the vectors")] = 1.0,
    data: Annotated[
        str | None,
        typer.Option("--data", help="held-out task rows (JSONL): CE of base/finetune/vectors"),
    ] = None,
    task: Annotated[
        str, typer.Option("--task", help="the task's own eval side by side: numbers|facts|none")
    ] = "none",
    target: Annotated[
        str | None, typer.Option("--target", help="--task numbers: the animal (default owl)")
    ] = None,
    facts: Annotated[
        str | None,
        typer.Option("--facts", help="--task facts: the facts file (default: the built-in set)"),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="texts per forward")] = 8,
    seed: Annotated[int, typer.Option(help="corpus subset and bootstrap seed")] = 0,
) -> None:
    """Do the vectors do what the finetune does? KLs to base and to each other on a
    diverse corpus (95% CIs over texts), the fraction of the finetune's KL the vectors
    explain, and per-layer cosines of mean activation differences (first-k / all).

    Example: steerdiff read faithfulness default --finetuned runs/lora --vectors runs/v/vectors.safetensors
    """
    from steerdiff.interpret import FaithfulnessError, faithfulness
    from steerdiff.interpret.plots import faithfulness_png
    from steerdiff.io import atomic_write_json, provenance
    from steerdiff.models import load_model
    from steerdiff.vectors import VectorSet

    if not vectors:
        raise FaithfulnessError(
            "--vectors is required: the VectorSet to compare (a .safetensors file)."
        )
    if (finetuned is None) == (vectors_b is None):
        raise FaithfulnessError(
            "Give exactly one of --finetuned ADAPTER_OR_FOLDER or --vectors-b VECTORS "
            "(a second vector set to compare with --vectors)."
        )
    if task not in ("numbers", "facts", "none"):
        raise FaithfulnessError(f"--task {task!r} is not one of numbers, facts, none.")
    if task != "none" and vectors_b is not None:
        raise FaithfulnessError(
            "--task compares a finetune with the vectors; drop it with --vectors-b."
        )
    if task == "facts":
        from steerdiff.evals.facts_file import load_facts

        load_facts(facts)  # a bad facts file fails here, before the model and the KLs
    lm = load_model(model, dtype=dtype, device=device)
    vs = VectorSet.load(vectors, lm)
    vb = VectorSet.load(vectors_b, lm) if vectors_b else None
    labels = (vectors_b or finetuned, vectors)
    res = faithfulness(
        lm, finetuned=finetuned, vectors=vs, texts=corpus, vectors_b=vb, coeff=coeff,
        coeff_b=coeff, hooks=hooks, first_k=first_k, max_tokens=tokens, n_texts=n_texts,
        batch_size=batch_size, seed=seed, labels=labels, progress=True,
    )  # fmt: skip
    if data and finetuned:
        from steerdiff.fit.faithful import heldout_losses

        res.heldout = heldout_losses(lm, data, finetuned=finetuned, vectors=vs, coeff=coeff)
    if task != "none" and finetuned:
        from steerdiff.fit.faithful import task_eval_side_by_side

        res.task_eval = task_eval_side_by_side(
            lm, finetuned=finetuned, vectors=vs, task=task, coeff=coeff, target=target,
            facts=facts,
        )  # fmt: skip
    for line in res.summary_lines():
        console.print(line, highlight=False, soft_wrap=True)
    if res.heldout:
        h = res.heldout
        ci = h["gap_closed_ci"]
        gap = "n/a" if h["gap_closed"] is None else f"{h['gap_closed']:.3f}"
        ci_s = f" (95% CI {ci[0]:.3f} .. {ci[1]:.3f})" if ci else ""
        console.print(
            f"held-out CE per token: base {h['ce_base']:.4f}, finetune {h['ce_finetune']:.4f}, "
            f"vectors {h['ce_vectors']:.4f}; gap closed {gap}{ci_s}",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
    if res.task_eval:
        d = res.task_eval["finetune_minus_vectors"]
        if isinstance(d, dict) and "mean" in d:
            console.print(
                f"task eval, finetune - vectors (paired per question): {d['mean']:+.4f} "
                f"(95% CI {d['ci95'][0]:+.4f} .. {d['ci95'][1]:+.4f})",
                highlight=False, soft_wrap=True,
            )  # fmt: skip
    o = Path(out)
    info = {**res.to_dict(), "provenance": provenance(lm, seed=seed)}
    atomic_write_json(o / "faithfulness.json", info)
    png = faithfulness_png(res, o / "faithfulness.png")
    console.print(f"wrote {o / 'faithfulness.json'}, {png}")
