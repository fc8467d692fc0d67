"""Train TopK SAEs at one or several hooks of a model, from the same forward passes.

    from steerdiff.fit.sae_train import SAETrainConfig, train_saes
    cfg = SAETrainConfig(hooks=["blocks.15.hook_resid_post", "blocks.24.hook_resid_post"])
    saes = train_saes(lm, cfg, "runs/sae", texts=texts)   # {hook: SAE}, out/<hook>/ folders

Texts -> model -> shuffle buffer -> SAE steps (fit.sae_activations), the TopK recipe of
Gao et al. 2024 / EleutherAI sparsify (fit.sae_topk: AuxK, unit-norm decoder rows, the
decoder gradient along its rows removed, lr 2e-4 / sqrt(d_sae / 2^14), b_dec from the data's
mean), and SAELens' activation normalisation "expected_average_only_in": each hook's
activations are multiplied by scale = sqrt(d_in) / mean |x| (estimated on the first
buffer of activations, `buffer_tokens` tokens) so their mean norm is sqrt(d_in); at save the
factor is folded into the weights (sae_topk.fold_scale), so the saved SAE reads raw
activations.

The folder `out`:
    sae_train.json   the settings (config, model weights hash, texts' sha256) and status
    checkpoint.pt    SAE parameters, Adam state, step, tokens, data cursor, RNG, dead-latent
                     counters, scales: written atomically every `checkpoint_every` steps
                     and at the end
    <hook>/          each SAE as a SAELens folder (cfg.json's "steerdiff" key: provenance,
                     settings, scale, training figures)
    metrics.json     evaluate_saes on the held-out texts + training figures, wall times

Re-running with the same `out` resumes from checkpoint.pt (same final weights as a run that
was never interrupted); with other settings it is refused in one line naming them.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from ..errors import SteerdiffError
from ..hooks import HOOK_SUFFIXES, hook_dim, list_hook_points, n_layers
from ..io import atomic_path, atomic_write_json, provenance, read_json
from ..models import LoadedModel
from ..progress import progress as progress_bar
from ..sae import SAE, load_sae, save_sae
from .sae_activations import ActivationStream, Cursor
from .sae_metrics import evaluate_saes
from .sae_topk import TopKTrainer, auto_lr

MARKER = "sae_train.json"
CHECKPOINT = "checkpoint.pt"
# settings that do not change the trained weights: a resume may change them
NOT_IN_FINGERPRINT = ("checkpoint_every", "eval_tokens")


class SAETrainError(SteerdiffError, ValueError):
    """Bad SAE training settings or output folder; the message names the option and the fix."""


class SAETrainConfig(BaseModel):
    """`steerdiff sae train`'s options (and an experiment file's [sae.train] table)."""

    model_config = ConfigDict(extra="forbid")

    hooks: list[str]
    expansion: int = 8  # d_sae = expansion x d_in
    k: int = 32  # latents per token (TopK)
    tokens: int = 600_000  # training tokens per hook
    batch_tokens: int = 4096  # tokens per SAE step
    lr: float | None = None  # None: 2e-4 / sqrt(d_sae / 2^14)
    max_len: int = 256  # tokens per window (a forward pass' row)
    seed: int = 0
    buffer_tokens: int = 65_536  # shuffle buffer (activations held per hook)
    model_batch: int = 8  # windows per forward pass
    auxk_alpha: float = 1 / 32
    dead_tokens: int | None = None  # None: min(10M, tokens / 10), at least one batch
    eval_texts: int = 64  # texts held out for the evaluation
    eval_tokens: int = 16_384  # evaluation tokens (at most)
    checkpoint_every: int = 50  # steps
    # the text mix (tasks.sae_texts; the CLI and the pipeline build the texts from these)
    corpus: str = "default"
    n_corpus: int | None = None  # None: all of it
    n_chat: int | None = None  # None: every packaged prompt
    n_numbers: int = 1000

    def resolved_dead_tokens(self) -> int:
        if self.dead_tokens is not None:
            return self.dead_tokens
        return max(self.batch_tokens, min(10_000_000, self.tokens // 10))


def check_config(cfg: SAETrainConfig, lm: LoadedModel) -> None:
    """One-line SAETrainError for a setting that cannot work with this model."""
    names = set(list_hook_points(lm))
    n = n_layers(lm)
    if not cfg.hooks:
        raise SAETrainError(f"--hooks is empty: give e.g. blocks.{n - 1}.hook_resid_post.")
    for h in cfg.hooks:
        if h not in names:
            raise SAETrainError(
                f"--hooks: unknown hook {h!r}; this model's hooks are blocks.N.SUFFIX with N in "
                f"0-{n - 1} and SUFFIX one of {', '.join(HOOK_SUFFIXES)} "
                f"(e.g. blocks.{n - 1}.hook_resid_post)."
            )
    if len(set(cfg.hooks)) != len(cfg.hooks):
        raise SAETrainError(f"--hooks names a hook twice ({', '.join(cfg.hooks)}): give each once.")
    if cfg.expansion < 1 or cfg.expansion > 256:
        raise SAETrainError(
            f"--expansion {cfg.expansion} is out of range: give an integer in 1-256 "
            "(d_sae = expansion x d_in; 8 is the default)."
        )
    for h in cfg.hooks:
        d_sae = cfg.expansion * hook_dim(lm, h)
        if not 1 <= cfg.k <= d_sae:
            raise SAETrainError(
                f"--k {cfg.k} is out of range for {h}: d_sae = {cfg.expansion} x "
                f"{hook_dim(lm, h)} = {d_sae} latents, so give 1 <= k <= {d_sae} (32 is the default)."
            )
    if cfg.batch_tokens < 1 or cfg.tokens < cfg.batch_tokens:
        raise SAETrainError(
            f"--tokens {cfg.tokens} is fewer than --batch-tokens {cfg.batch_tokens}: not one "
            "SAE step; give more tokens or a smaller batch."
        )
    if cfg.buffer_tokens < cfg.batch_tokens:
        raise SAETrainError(
            f"--buffer-tokens {cfg.buffer_tokens} is fewer than --batch-tokens "
            f"{cfg.batch_tokens}: the shuffle buffer must hold at least one batch."
        )
    if cfg.max_len < 2 or cfg.checkpoint_every < 1 or cfg.model_batch < 1:
        raise SAETrainError(
            "--max-len must be >= 2, --checkpoint-every and --model-batch >= 1; fix the option."
        )


def texts_sha256(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    return h.hexdigest()


def settings(cfg: SAETrainConfig, lm: LoadedModel, texts: list[str]) -> dict[str, Any]:
    """What a resume must share with the run it continues."""
    conf = {k: v for k, v in cfg.model_dump().items() if k not in NOT_IN_FINGERPRINT}
    return {
        **conf,
        "model_weights": lm.weights_hash,
        "texts_sha256": texts_sha256(texts),
        "n_texts": len(texts),
    }


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def prepare_out(out: Path, want: dict, overwrite: bool) -> str:
    """'new', 'resume' or 'done'; one-line SAETrainError for a folder we may not write into."""
    if out.exists() and not out.is_dir():
        raise SAETrainError(f"--out {out} is a file; give a folder for the SAE training run.")
    if not out.is_dir() or not any(out.iterdir()):
        return "new"
    if not (out / MARKER).is_file():
        raise SAETrainError(
            f"--out {out} exists and is not a steerdiff SAE training folder (no {MARKER}); "
            "nothing was touched: give a new or empty folder."
        )
    old = read_json(out / MARKER)
    if overwrite:
        for hook in old.get("settings", {}).get("hooks", []):
            if (out / hook).is_dir():
                shutil.rmtree(out / hook)
        for name in (CHECKPOINT, "metrics.json", MARKER):
            (out / name).unlink(missing_ok=True)
        return "new"
    diffs = _differences(old.get("settings", {}), want)
    if diffs:
        raise SAETrainError(
            f"--out {out} holds an SAE training run with other settings ({'; '.join(diffs)}): "
            "re-run with its settings to resume it, or use another --out, or --overwrite."
        )
    return "done" if old.get("status") == "done" else "resume"


def split_texts(texts: list[str], n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out evaluation texts): a seeded choice of n_eval texts."""
    import random

    order = list(range(len(texts)))
    random.Random(f"sae-eval:{seed}").shuffle(order)
    n_eval = min(n_eval, len(texts) // 2)
    held = set(order[:n_eval])
    train = [t for i, t in enumerate(texts) if i not in held]
    return train, [texts[i] for i in order[:n_eval]]


def _save_checkpoint(out: Path, state: dict) -> None:
    with atomic_path(out / CHECKPOINT) as tmp:
        torch.save(state, tmp)


def train_saes(
    lm: LoadedModel,
    cfg: SAETrainConfig,
    out: str | Path,
    texts: list[str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, SAE]:
    """Train one TopK SAE per hook of cfg.hooks (see the module docstring); {hook: SAE}.

    texts: the training text (default: the offline corpus); cfg.eval_texts of them are
    held out for metrics.json. on_step(step) is called after every step (tests interrupt
    a run by raising from it)."""
    check_config(cfg, lm)
    if texts is None:
        from ..interpret.corpus import load_corpus

        texts = load_corpus(cfg.corpus, n=cfg.n_corpus, seed=cfg.seed).texts
    out = Path(out)
    want = settings(cfg, lm, texts)
    status = prepare_out(out, want, overwrite)
    if status == "done":
        return {h: load_sae(out / h, lm) for h in cfg.hooks}
    train_texts, eval_texts = split_texts(texts, cfg.eval_texts, cfg.seed)
    stream = ActivationStream(
        lm, cfg.hooks, train_texts, cfg.max_len, cfg.buffer_tokens, cfg.batch_tokens, cfg.seed,
        cfg.model_batch,
    )  # fmt: skip
    if stream.windows_per_epoch < cfg.model_batch:
        raise SAETrainError(
            f"The training texts hold only {stream.windows_per_epoch} windows of --max-len "
            f"{cfg.max_len} tokens, fewer than --model-batch {cfg.model_batch}: give more texts."
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        out / MARKER, {"kind": "steerdiff sae train", "settings": want, "status": "training"}
    )
    run = _start(lm, cfg, out, stream)
    _loop(cfg, out, stream, run, progress, on_step)
    return _finish(lm, cfg, out, stream, run, want, eval_texts)


def _start(lm: LoadedModel, cfg: SAETrainConfig, out: Path, stream: ActivationStream) -> dict:
    """The run's state: from checkpoint.pt, or new (scales and b_dec from the first buffer)."""
    dims = {h: hook_dim(lm, h) for h in cfg.hooks}

    def trainer(i: int, h: str, b_dec: torch.Tensor | None) -> TopKTrainer:
        d_sae = cfg.expansion * dims[h]
        lr = cfg.lr if cfg.lr is not None else auto_lr(d_sae)
        return TopKTrainer(
            dims[h], d_sae, cfg.k, lr, seed=cfg.seed * 1000 + i, b_dec=b_dec,
            auxk_alpha=cfg.auxk_alpha, dead_tokens=cfg.resolved_dead_tokens(),
        )  # fmt: skip

    if (out / CHECKPOINT).is_file():
        ck = torch.load(out / CHECKPOINT, weights_only=False)
        trainers = {h: trainer(i, h, None) for i, h in enumerate(cfg.hooks)}
        for h, t in trainers.items():
            t.load_state_dict(ck["trainers"][h])
        torch.set_rng_state(ck["rng"])
        return {**ck, "trainers": trainers, "cursor": Cursor(**ck["cursor"])}
    first = stream.first_block()
    scales, trainers = {}, {}
    for i, h in enumerate(cfg.hooks):
        scales[h] = math.sqrt(dims[h]) / float(first[h].norm(dim=-1).mean())
        trainers[h] = trainer(i, h, (first[h] * scales[h]).mean(0))
    return {
        "step": 0, "tokens": 0, "cursor": Cursor(), "scales": scales, "trainers": trainers,
        "forward_seconds": stream.forward_seconds, "sae_seconds": 0.0, "last": {},
    }  # fmt: skip


def _checkpoint(out: Path, run: dict) -> None:
    state = {
        **{k: v for k, v in run.items() if k not in ("trainers", "cursor")},
        "trainers": {h: t.state_dict() for h, t in run["trainers"].items()},
        "cursor": run["cursor"].to_dict(),
        "rng": torch.get_rng_state(),
    }
    _save_checkpoint(out, state)


def _loop(cfg, out: Path, stream: ActivationStream, run: dict, show: bool, on_step) -> None:
    total = math.ceil(cfg.tokens / cfg.batch_tokens)
    if run["step"] >= total:
        return
    bar = progress_bar(total * cfg.batch_tokens, "sae train (tokens)", run["tokens"], not show)
    f0 = stream.forward_seconds
    with bar:
        for cursor, batch in stream.batches(run["cursor"]):
            t0 = time.perf_counter()
            for h, t in run["trainers"].items():
                run["last"][h] = t.step(batch[h] * run["scales"][h])
            run["sae_seconds"] += time.perf_counter() - t0
            run["forward_seconds"] += stream.forward_seconds - f0
            f0 = stream.forward_seconds
            run["step"] += 1
            run["tokens"] += cfg.batch_tokens
            run["cursor"] = cursor
            bar.update(cfg.batch_tokens)
            bar.set_postfix(
                {
                    h.replace("blocks.", "L").split(".")[0]: "fvu {fvu:.3f} L0 {l0:.0f} dead {dead:.2f}".format(**s)
                    for h, s in run["last"].items()
                }
            )  # fmt: skip
            if run["step"] % cfg.checkpoint_every == 0 or run["step"] >= total:
                _checkpoint(out, run)
            if on_step is not None:
                on_step(run["step"])
            if run["step"] >= total:
                break


def _finish(lm, cfg, out: Path, stream, run: dict, want: dict, eval_texts: list[str]) -> dict:
    """Fold the scales in, save each SAE, evaluate on the held-out texts, write metrics.json."""
    prov = provenance(lm, config=cfg, seed=cfg.seed)
    saes = {}
    for h, t in run["trainers"].items():
        sae = t.to_sae(run["scales"][h], h)
        train = {
            "scale": run["scales"][h],
            "normalisation": "expected_average_only_in: trained on x * scale "
            "(mean |x * scale| = sqrt(d_in)); the scale is folded into these weights",
            "tokens": run["tokens"],
            "steps": run["step"],
            "last_step": run["last"].get(h, {}),
            "dead_fraction": t.dead_fraction(),
            "dead_definition": f"latents that did not fire in the last {t.dead_tokens} training tokens",
        }
        save_sae(sae, out / h, extra={"steerdiff": {**prov, "settings": want, "train": train}})
        saes[h] = load_sae(out / h, lm)
        run["last"][h] = train
    t0 = time.perf_counter()
    metrics = evaluate_saes(lm, list(saes.values()), eval_texts, cfg.max_len, cfg.eval_tokens)
    eval_s = time.perf_counter() - t0
    for h in saes:
        metrics[h]["train"] = run["last"][h]
    atomic_write_json(
        out / "metrics.json",
        {
            "hooks": metrics,
            "tokens": run["tokens"],
            "steps": run["step"],
            "wall_seconds": {
                "activations": run["forward_seconds"],
                "sae_steps": run["sae_seconds"],
                "eval": eval_s,
            },
            "settings": want,
            "provenance": prov,
        },
    )
    atomic_write_json(
        out / MARKER, {"kind": "steerdiff sae train", "settings": want, "status": "done"}
    )
    return saes
