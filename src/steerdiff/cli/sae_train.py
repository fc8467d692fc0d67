"""`steerdiff sae train` (TopK SAEs at one or several hooks, resumable) and `steerdiff sae eval`
(explained variance, L0, dead latents, CE loss recovered, for any SAE steerdiff can load)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import (
    DEFAULT_MODEL,
    CorpusOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    ThreadsOpt,
    console,
)
from .sae_app import HookOpt, SaeArg, app


def _table(metrics: dict[str, dict]) -> str:
    lines = [
        f"{'hook':30} {'EV':>6} {'L0':>6} {'dead':>6} {'CE clean':>9} {'spliced':>8} "
        f"{'zero-abl':>9} {'recovered':>9}"
    ]
    for hook, m in metrics.items():
        lines.append(
            f"{hook:30} {m['explained_variance']:6.3f} {m['l0']:6.1f} {m['dead_fraction']:6.3f} "
            f"{m['ce_clean']:9.4f} {m['ce_spliced']:8.4f} {m['ce_zero_ablated']:9.4f} "
            f"{m['ce_recovered']:9.3f}"
        )
    n = next(iter(metrics.values()))
    lines.append(
        f"({n['n_tokens']} held-out tokens from {n['n_texts']} texts; dead = never fired on them)"
    )
    return "\n".join(lines)


@app.command("train")
def train(
    hooks: Annotated[
        str, typer.Option("--hooks", help="comma-separated hooks, e.g. blocks.15.hook_resid_post")
    ],
    out: Annotated[str, typer.Option("--out", help="the run folder (re-run it to resume)")],
    model: ModelOpt = DEFAULT_MODEL,
    expansion: Annotated[int, typer.Option(help="d_sae = expansion x d_in")] = 8,
    k: Annotated[int, typer.Option(help="latents per token (TopK)")] = 32,
    tokens: Annotated[int, typer.Option(help="training tokens per hook")] = 600_000,
    batch_tokens: Annotated[int, typer.Option(help="tokens per SAE step")] = 4096,
    lr: Annotated[float | None, typer.Option(help="default 2e-4 / sqrt(d_sae / 2^14)")] = None,
    max_len: Annotated[int, typer.Option(help="tokens per window")] = 256,
    seed: int = 0,
    corpus: CorpusOpt = "default",
    n_corpus: Annotated[int | None, typer.Option(help="corpus texts (default all)")] = None,
    n_chat: Annotated[int | None, typer.Option(help="chat prompts (default all)")] = None,
    n_numbers: Annotated[int, typer.Option(help="number-task chats")] = 1000,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = 50,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="start again in --out (an earlier run is deleted)")
    ] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = 0,
) -> None:
    """Train TopK SAEs at one or several hooks from the same forward passes (corpus + chat +
    number-task text); writes OUT/<hook>/ (SAELens folders) and OUT/metrics.json."""
    import torch

    from steerdiff.fit.sae_train import SAETrainConfig, train_saes
    from steerdiff.models import load_model
    from steerdiff.tasks.sae_texts import sae_texts

    if threads:
        torch.set_num_threads(threads)
    cfg = SAETrainConfig(
        hooks=[h.strip() for h in hooks.split(",") if h.strip()],
        expansion=expansion, k=k, tokens=tokens, batch_tokens=batch_tokens, lr=lr,
        max_len=max_len, seed=seed, corpus=corpus, n_corpus=n_corpus, n_chat=n_chat,
        n_numbers=n_numbers, checkpoint_every=checkpoint_every,
    )  # fmt: skip
    lm = load_model(model, dtype=dtype, device=device)
    texts = sae_texts(lm.tokenizer, corpus, n_corpus, n_chat, n_numbers, seed)
    train_saes(lm, cfg, out, texts=texts, overwrite=overwrite)
    from steerdiff.io import read_json

    metrics = read_json(f"{out}/metrics.json")
    console.print(_table(metrics["hooks"]), markup=False, highlight=False)
    console.print(f"SAEs in {out}/<hook>/, metrics in {out}/metrics.json", markup=False)


@app.command("eval")
def eval_cmd(
    sae_path: SaeArg,
    model: ModelOpt = DEFAULT_MODEL,
    hook: HookOpt = None,
    corpus: CorpusOpt = "default",
    n_texts: Annotated[int, typer.Option(help="held-out texts (a seeded choice)")] = 200,
    max_tokens: Annotated[int, typer.Option(help="evaluation tokens at most")] = 16_384,
    max_len: Annotated[int, typer.Option(help="tokens per text at most")] = 256,
    seed: int = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print the metrics as JSON")] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """Explained variance, L0, dead fraction and CE loss recovered (vs zero-ablation) of any
    SAE (SAELens, Gemma Scope, sparsify, or one `sae train` wrote) on corpus texts."""
    from steerdiff.fit.sae_metrics import evaluate_sae
    from steerdiff.interpret.corpus import load_corpus
    from steerdiff.models import load_model
    from steerdiff.sae import load_sae

    lm = load_model(model, dtype=dtype, device=device)
    sae = load_sae(sae_path, lm, hook=hook)
    texts = load_corpus(corpus, n=n_texts, seed=seed).texts
    m = evaluate_sae(lm, sae, texts, max_len=max_len, max_tokens=max_tokens)
    if as_json:
        print(json.dumps(m, indent=2))
    else:
        console.print(_table({sae.hook: m}), markup=False, highlight=False)
