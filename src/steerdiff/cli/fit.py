"""`steerdiff fit`: fit a VectorSet (or a LoRA / full baseline) to a dataset.

The options of the fit itself are made from `steerdiff.fit.FitConfig`'s fields (name, type,
default, description), so a new FitConfig field is a `fit` option without editing this file:
`max_norm: float | None = None` becomes `--max-norm FLOAT` (common.OPTION_SPELLINGS keeps the
older `--steps` and `--patience`), a `bool` field `--name/--no-name`,
a `Literal` field a string option that FitConfig checks. A field of a type the command line
cannot spell (e.g. a dict) becomes an option taking JSON.
"""

from __future__ import annotations

import inspect
import json
import types
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import typer

from .common import DeviceOpt, DtypeOpt, ModelOpt, ThreadsOpt, console, fail, option_flag

app = typer.Typer()

_SCALARS = (str, int, float, bool)


def option_type(annotation: Any) -> tuple[Any, tuple[str, ...]] | None:
    """(a type typer parses, the allowed choices) for a field's type; None: not spellable.

    Literal fields become str options (FitConfig checks the choice, so a bad one is reported
    like any bad option); `X | None`, list[scalar] and fixed tuples of scalars pass as they are.
    """
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation in _SCALARS:
        return annotation, ()
    if origin is Literal and all(isinstance(a, str) for a in args):
        return str, args
    if origin in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        inner = option_type(rest[0]) if len(rest) == 1 else None
        if inner is None or inner[0] is bool:
            return None
        return inner[0] | None, inner[1]
    if origin is list and len(args) == 1 and args[0] in _SCALARS:
        return annotation, ()
    if origin is tuple and args and Ellipsis not in args and all(a in _SCALARS for a in args):
        return annotation, ()
    return None


def json_fields() -> set[str]:
    """FitConfig fields whose option takes JSON (types the command line cannot spell)."""
    from steerdiff.fit import FitConfig

    return {n for n, f in FitConfig.model_fields.items() if option_type(f.annotation) is None}


def fit_config_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per FitConfig field, annotated as a typer option."""
    from steerdiff.fit import FitConfig

    params = []
    for name, field in FitConfig.model_fields.items():
        default = (
            inspect.Parameter.empty
            if field.is_required()
            else field.get_default(call_default_factory=True)
        )
        help_text = field.description or ""
        spelled = option_type(field.annotation)
        if spelled is None:  # JSON
            kind: Any = str
            help_text = f"{help_text} (JSON)".strip()
            if default is not inspect.Parameter.empty:
                default = json.dumps(default)
        else:
            kind, choices = spelled
            if choices:
                help_text = " | ".join(choices) + (f": {help_text}" if help_text else "")
        flag = option_flag(name)  # --field-name, or its older spelling (--steps)
        if kind is bool:
            flag = f"{flag}/--no-{flag[2:]}"
        option = typer.Option(flag, help=help_text)
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=Annotated[kind, option],
            )
        )
    return params


F = TypeVar("F", bound=Callable[..., Any])


def with_fit_config_options(command: F) -> F:
    """Give `command(..., model, **config)` one option per FitConfig field, after `model`.

    typer reads a command's options from its signature; this sets that signature, and typer
    passes the FitConfig options to the command's **config.
    """
    own = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(command, eval_str=True).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    generated = fit_config_parameters()
    clash = {p.name for p in own} & {p.name for p in generated}
    if clash:
        raise TypeError(f"FitConfig field(s) {sorted(clash)} clash with `fit`'s own options")
    cut = [p.name for p in own].index("model") + 1
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        own[:cut] + generated + own[cut:], return_annotation=None
    )
    return command


@app.command("fit")
@with_fit_config_options
def fit_cmd(
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="dataset .jsonl ({messages} chats, {prompt, completion} pairs or {text} "
            "documents; a .manifest.json beside it gives the teacher), or hf:ORG/NAME[:split] "
            "(a Hugging Face dataset: needs the hub extra); docs/dataset-format.md",
        ),
    ],
    out: Annotated[str, typer.Option("--out", help="output folder (vectors, metrics, checkpoint)")],
    model: ModelOpt = "default",
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from --out's checkpoint")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace an earlier fit in --out")
    ] = False,
    baseline: Annotated[
        str | None, typer.Option(help="lora | full: train a real finetune instead of vectors")
    ] = None,
    lora_r: Annotated[int, typer.Option(help="LoRA rank")] = 8,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha")] = 8.0,
    lora_targets: Annotated[
        str | None, typer.Option(help="comma-separated LoRA target modules")
    ] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = 0,
    **config: Any,
) -> None:
    """Fit vectors at hook points (weights frozen) to a dataset, or a LoRA/full baseline.

    Example: steerdiff fit --data owl.jsonl --hooks 'blocks.*.attn.hook_{q,k,v}'
    --out runs/owl_qkv  (objective auto: online distillation when the data's manifest
    names a teacher that runs on this model, else top-k distillation when the rows carry
    top-k log-probs, else SFT; lr in activation units; at most 20 epochs, stopping when
    the validation loss converges; cosine schedule, 2 warmup steps, 20% validation rows)
    """
    from steerdiff.fit import (
        FitConfig,
        LoraConfig,
        check_out_dir,
        data_provenance,
        fit,
        fit_full,
        fit_lora,
        maybe_init_distributed,
        read_rows,
    )
    from steerdiff.models import load_model

    for name in json_fields():
        try:
            config[name] = json.loads(config[name])
        except json.JSONDecodeError as e:
            fail(f"{option_flag(name)} takes JSON ({e}), got {config[name]!r}")
    cfg = FitConfig(**config)  # a bad value: "error: bad option --NAME: ..."
    if baseline not in (None, "lora", "full"):
        fail(f"--baseline must be lora or full, not {baseline!r}")
    if baseline and cfg.whiten:
        fail(
            f"--whiten measures fitted vectors; a --baseline {baseline} finetune has none: drop it"
        )
    check_out_dir(out, overwrite=overwrite, resume=resume)  # before the model loads
    if threads:
        import torch

        torch.set_num_threads(threads)
    rows = read_rows(data)  # a missing / broken file, a hub error, mixed formats: said
    data_provenance(rows)  # before the model loads
    rank, _ = maybe_init_distributed()
    lm = load_model(model, dtype=dtype, device=device)
    if baseline == "lora":
        targets = lora_targets.split(",") if lora_targets else None
        lora = LoraConfig(r=lora_r, alpha=lora_alpha, dropout=0.0, target_modules=targets)
        res = fit_lora(lm, rows, cfg, lora, out_dir=out, resume=resume)
    elif baseline == "full":
        res = fit_full(lm, rows, cfg, out_dir=out, resume=resume)
    else:
        res = fit(lm, rows, cfg, out_dir=out, resume=resume)
    if rank == 0:
        summary = res.summary()
        console.print_json(json.dumps(summary, default=str))
        for line in gap_lines(summary):
            console.print(line, soft_wrap=True, markup=False)
        console.print(
            f"wrote {out}/ (result.json, metrics.jsonl, metrics.csv, "
            + ("vectors.safetensors" if baseline is None else "adapter/model weights")
            + (", latent_code.safetensors" if baseline is None and cfg.basis == "sae" else "")
            + ")",
            markup=False,
        )


def _pct(x: float) -> str:
    return f"{x:.0%}"


def gap_lines(summary: dict) -> list[str]:
    """Plain sentences for the validation figures: the objective, each gap closed with its
    bootstrap interval, the rows and tokens behind it, the gap itself in nats per token, and
    a flag when the CE gap is within noise (`fit.losses.gap_within_noise`)."""
    from steerdiff.fit.losses import NOISE_GAP_NATS

    out = []
    if summary.get("objective"):
        out.append(f"objective: {summary['objective']}")
    rows, tokens = summary.get("n_val_rows"), summary.get("n_val_tokens")
    behind = f" on {rows} validation rows ({tokens:,} tokens)" if rows and tokens else ""
    kl_name = "online KL" if summary.get("objective") == "online" else "top-k KL"
    for key, what in (("gap_closed", "cross-entropy"), ("kl_gap_closed", kl_name)):
        value, ci = summary.get(key), summary.get(f"{key}_ci")
        if value is None:
            continue
        line = f"{what} gap to the teacher closed: {_pct(value)}"
        if ci:
            line += f" (95% CI {_pct(ci[0])} to {_pct(ci[1])})"
        line += behind
        if key == "gap_closed" and summary.get("ce_gap") is not None:
            line += f"; base - teacher = {summary['ce_gap']:.4f} nats/token"
            if summary.get("ce_gap_within_noise"):
                line += (
                    f", under {NOISE_GAP_NATS}: within noise (the fraction can swing far "
                    "outside 0..1; read the KL figure)"
                )
        if key == "kl_gap_closed" and summary.get("kl_gap") is not None:
            line += f"; base KL to the teacher = {summary['kl_gap']:.4f} nats/token"
        if ci and ci[0] <= 0.0 <= ci[1]:
            line += "; the interval contains 0: not distinguishable from no change"
        out.append(line)
    for hook, f in (summary.get("vector_vs_teacher") or {}).items():
        out.append(
            f"{hook}: cosine with the teacher's vector {f['cosine']:.3f}, norm "
            f"{f['fitted_norm']:.2f} (teacher's {f['teacher_norm']:.2f})"
        )
    if summary.get("stopped") == "converged":
        out.append(f"stopped: converged after {summary.get('steps')} steps")
    if summary.get("gap_closed") is None and summary.get("fitted_val_loss") is not None:
        out.append(
            f"validation cross-entropy{behind}: base {summary['base_val_loss']:.4f}, fitted "
            f"{summary['fitted_val_loss']:.4f} nats/token (no teacher loss: no gap closed)"
        )
    return out
