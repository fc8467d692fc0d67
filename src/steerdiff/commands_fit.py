"""`steerdiff fit`: fit a VectorSet (or a LoRA / full baseline) to a dataset."""

from __future__ import annotations

import json
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("fit")
    def fit_cmd(
        data: Annotated[
            str,
            typer.Option("--data", help="dataset .jsonl (its .manifest.json gives the teacher)"),
        ],
        out: Annotated[
            str, typer.Option("--out", help="output folder (vectors, metrics, checkpoint)")
        ],
        model: Annotated[
            str, typer.Option("--model", help="'default', 'gemma3-270m', hub id, folder or .gguf")
        ] = "default",
        hooks: Annotated[
            list[str] | None,
            typer.Option(
                "--hooks", help="hook pattern(s), repeatable, e.g. 'blocks.*.attn.hook_{q,k,v}'"
            ),
        ] = None,
        objective: Annotated[str, typer.Option(help="sft | distill")] = "sft",
        optimizer: Annotated[str, typer.Option(help="adam | adamw | sgd | signsgd")] = "adam",
        lr: Annotated[float, typer.Option(help="learning rate")] = 1e-2,
        momentum: Annotated[float, typer.Option(help="sgd / signsgd momentum")] = 0.0,
        schedule: Annotated[str, typer.Option(help="constant | linear | cosine")] = "constant",
        warmup_steps: Annotated[int, typer.Option(help="linear warmup steps")] = 0,
        epochs: Annotated[int, typer.Option(help="passes over the training rows")] = 1,
        steps: Annotated[
            int | None, typer.Option("--steps", help="stop after this many optimizer steps")
        ] = None,
        batch_size: Annotated[int, typer.Option(help="rows per optimizer step")] = 16,
        micro_batch_size: Annotated[
            int | None, typer.Option(help="rows per forward (gradient accumulation)")
        ] = None,
        val_fraction: Annotated[float, typer.Option(help="validation fraction")] = 0.1,
        eval_every: Annotated[
            int, typer.Option(help="evaluate every N steps (0 = each epoch)")
        ] = 0,
        patience: Annotated[
            int | None, typer.Option(help="early stopping patience (evals)")
        ] = None,
        init: Annotated[str, typer.Option(help="zero | random")] = "zero",
        max_norm: Annotated[float | None, typer.Option(help="cap each vector's norm")] = None,
        checkpoint_every: Annotated[int, typer.Option(help="checkpoint every N steps")] = 50,
        seed: Annotated[int, typer.Option(help="seed (split, order, init)")] = 0,
        resume: Annotated[
            bool, typer.Option("--resume", help="continue from --out's checkpoint")
        ] = False,
        baseline: Annotated[
            str | None, typer.Option(help="lora | full: train a real finetune instead of vectors")
        ] = None,
        lora_r: Annotated[int, typer.Option(help="LoRA rank")] = 8,
        lora_alpha: Annotated[float, typer.Option(help="LoRA alpha")] = 8.0,
        lora_targets: Annotated[
            str | None, typer.Option(help="comma-separated LoRA target modules")
        ] = None,
        dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
        device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    ) -> None:
        """Fit vectors at hook points (weights frozen) to a dataset, or a LoRA/full baseline.

        Example: steerdiff fit --data owl.jsonl --hooks 'blocks.*.attn.hook_{q,k,v}'
        --objective distill --epochs 3 --out runs/owl_qkv
        """
        from pydantic import ValidationError

        from .cli import console, fail
        from .fit import FitConfig, FitError, fit, maybe_init_distributed
        from .models import ModelLoadError, load_model

        hooks = hooks or ["blocks.*.attn.hook_{q,k,v}"]
        try:
            cfg = FitConfig(
                hooks=hooks,
                objective=objective,
                optimizer=optimizer,
                lr=lr,
                momentum=momentum,
                schedule=schedule,
                warmup_steps=warmup_steps,
                epochs=epochs,
                max_steps=steps,
                batch_size=batch_size,
                micro_batch_size=micro_batch_size,
                val_fraction=val_fraction,
                eval_every=eval_every,
                early_stopping_patience=patience,
                init=init,
                max_norm=max_norm,
                checkpoint_every=checkpoint_every,
                seed=seed,
            )
        except ValidationError as e:
            fail(f"bad option: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}")
        if baseline not in (None, "lora", "full"):
            fail(f"--baseline must be lora or full, not {baseline!r}")
        rank, _ = maybe_init_distributed()
        try:
            lm = load_model(model, dtype=dtype, device=device)
            if baseline == "lora":
                from .fit import LoraConfig, fit_lora

                targets = lora_targets.split(",") if lora_targets else None
                res = fit_lora(
                    lm,
                    data,
                    cfg,
                    LoraConfig(r=lora_r, alpha=lora_alpha, target_modules=targets),
                    out_dir=out,
                    resume=resume,
                )
            elif baseline == "full":
                from .fit import fit_full

                res = fit_full(lm, data, cfg, out_dir=out, resume=resume)
            else:
                res = fit(lm, data, cfg, out_dir=out, resume=resume)
        except (FitError, ModelLoadError, ValueError) as e:
            fail(str(e))
        if rank == 0:
            console.print_json(json.dumps(res.summary(), default=str))
            for line in gap_lines(res.summary()):
                console.print(line)
            console.print(
                f"wrote {out}/ (result.json, metrics.jsonl, metrics.csv, "
                + ("vectors.safetensors" if baseline is None else "adapter/model weights")
                + ")"
            )


def gap_lines(summary: dict) -> list[str]:
    """Plain sentences for the gap-closed figures and their bootstrap intervals."""
    out = []
    for key, what in (("gap_closed", "cross-entropy"), ("kl_gap_closed", "top-k KL")):
        value, ci = summary.get(key), summary.get(f"{key}_ci")
        if value is None:
            continue
        line = f"{what} gap to the teacher closed: {value:.0%}"
        if ci:
            line += f" (95% CI {ci[0]:.0%} to {ci[1]:.0%} over validation rows)"
            if ci[0] <= 0.0 <= ci[1]:
                line += ": not distinguishable from no change"
        out.append(line)
    return out
