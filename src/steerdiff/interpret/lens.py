"""Activation-difference lens (after Minder, Dumas et al. 2025).

Run a model with and without a change (a VectorSet added to it, or a finetuned model /
LoRA adapter against its base) on diverse text, and average the activation difference
(changed minus base) at chosen hooks:

  (a) per position, for each of the first k token positions (the published method reads
      positions 0-4 separately; averaging over all positions washes the signal out), and
  (b) over all real (non-padding) positions, optionally skipping the first few.

Each mean difference is read through the centred DLA, and the mean difference of the
final logits is reported too (top tokens promoted and suppressed): see lens_readout.

Batching: texts are sorted by length and right-padded. For a VectorSet, blocks below the
first vector's layer are run once: the base forward records how the model calls each
later block (its input, masks, rotary embeddings; steerdiff.replay), and the changed run
replays only the blocks from the first vector's layer on, with the vectors added at
every real token. For a vector at layer 24 of 30 that is 1.2 forwards per batch, not 2.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import SteerdiffError
from ..hooks import family_of, get_hook_point, record, select_hooks, steer
from ..models import LoadedModel, load_model, unwrap
from ..progress import progress as progress_bar
from ..replay import full_hidden, prefix_hidden, recording
from ..vectors import VectorSet, VectorSetError
from .batching import padded_batches, tokenize_texts
from .corpus import Corpus, as_corpus
from .lens_readout import LensResult
from .variants import adapter_context


class LensError(SteerdiffError, ValueError):
    """Bad lens arguments (k larger than the texts, no hooks...); the message says why."""


def check_vectors_for(model: nn.Module | LoadedModel, vectors: Mapping[str, torch.Tensor]) -> None:
    """Raise VectorSetError if a set does not fit; warn if it was fitted on other weights."""
    if isinstance(vectors, VectorSet):
        vectors.check_fits(unwrap(model))
        want = vectors.metadata.get("weights_hash")
        have = getattr(model, "weights_hash", None)
        if want and have and want != have:
            warnings.warn(
                f"The VectorSet was made on weights {want} (model {vectors.metadata.get('model_id')!r}) "
                f"but this model's weights hash is {have}; results may not mean much.",
                stacklevel=3,
            )
    else:
        hf = unwrap(model)
        for name, v in vectors.items():
            hp = get_hook_point(hf, name)
            if tuple(v.shape) != (hp.dim,):
                raise VectorSetError(
                    f"Vector {name} has shape {tuple(v.shape)}, expected ({hp.dim},) on this model."
                )


@dataclass
class _Acc:
    """Running sums of differences, in float64."""

    first_k: int
    skip_first: int
    pos_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # [k, dim]
    all_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # [dim]
    pos_count: torch.Tensor | None = None  # [k]
    n_tokens: int = 0

    def add(self, name: str, diff: torch.Tensor, mask: torch.Tensor) -> None:
        """diff [B, L, dim], mask [B, L] (1 = real token)."""
        k, L = self.first_k, diff.shape[1]
        m = mask.to(torch.float64)
        d = diff.double()
        kk = min(k, L)
        ps = torch.zeros(k, d.shape[-1], dtype=torch.float64)
        ps[:kk] = torch.einsum("bpd,bp->pd", d[:, :kk], m[:, :kk])
        ma = m.clone()
        ma[:, : self.skip_first] = 0
        asum = torch.einsum("bpd,bp->d", d, ma)
        if name not in self.pos_sum:
            self.pos_sum[name], self.all_sum[name] = ps, asum
        else:
            self.pos_sum[name] += ps
            self.all_sum[name] += asum

    def count(self, mask: torch.Tensor) -> None:
        k, L = self.first_k, mask.shape[1]
        c = torch.zeros(k, dtype=torch.float64)
        c[: min(k, L)] = mask[:, :k].double().sum(0)
        self.pos_count = c if self.pos_count is None else self.pos_count + c
        self.n_tokens += int(mask[:, self.skip_first :].sum())


def activation_difference_lens(
    model: LoadedModel | nn.Module,
    texts: Corpus | list[str] | str | None = None,
    vectors: Mapping[str, torch.Tensor] | None = None,
    finetuned: LoadedModel | nn.Module | str | None = None,
    hooks: str | list[str] = "blocks.*.hook_resid_post",
    coeff: float = 1.0,
    first_k: int = 5,
    max_tokens: int = 64,
    batch_size: int = 16,
    skip_first: int = 0,
    n_texts: int | None = None,
    tokenizer=None,
    progress: bool = False,
    difference: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> LensResult:
    """Mean activation difference (changed minus base) at `hooks` over `texts`.

    model: the base model. Exactly one of
      vectors: a VectorSet (or dict) added with `coeff` at every real token, or
      finetuned: another model of the same architecture (LoadedModel / HF model / spec),
        or the folder of a PEFT (LoRA) adapter for `model`.
    texts: a Corpus, a list of strings, or a corpus spec (see corpus.load_corpus);
      None = the offline default corpus. n_texts: take this many (seeded).
    first_k: positions read separately (0..first_k-1); max_tokens: tokens per text.
    skip_first: positions left out of the all-position mean (e.g. 1 to drop the first
      token, whose activations are massive in many models).
    difference: what is averaged at a hook, difference(hook, base, changed) -> [B, L, any
      width]; default changed - base. E.g. an SAE's encoding of both (sae_effects), so a
      reader in another basis reuses these batches, steering and finetune contexts.
    """
    diff = difference if difference is not None else (lambda _n, base, changed: changed - base)
    hf = unwrap(model)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise LensError("The lens needs a tokenizer: pass a LoadedModel or tokenizer=...")
    if (vectors is None) == (finetuned is None):
        raise LensError(
            "Give exactly one of vectors=... (a VectorSet) or finetuned=... (a model or adapter)."
        )
    if first_k < 1 or max_tokens < 1:
        raise LensError(f"first_k and max_tokens must be >= 1 (got {first_k}, {max_tokens}).")
    if first_k > max_tokens:
        raise LensError(
            f"first_k={first_k} is larger than max_tokens={max_tokens}: positions past "
            "max_tokens are never read. Use first_k <= max_tokens."
        )
    corpus = as_corpus(texts, n_texts)
    names = select_hooks(hf, hooks)
    if vectors is not None:
        check_vectors_for(model, vectors)
    ids = tokenize_texts(tok, corpus.texts, max_tokens)
    longest = max(len(r) for r in ids)
    if longest == 0:
        raise LensError("Every text tokenized to zero tokens.")
    if first_k > longest:
        raise LensError(
            f"first_k={first_k} is larger than the longest text ({longest} tokens after "
            f"tokenization, max_tokens={max_tokens}): no text reaches position {first_k - 1}. "
            "Use a smaller first_k or longer texts."
        )
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    acc = _Acc(first_k, skip_first)
    d_model = hf.config.hidden_size
    fin_pos = torch.zeros(first_k, d_model, dtype=torch.float64)
    fin_all = torch.zeros(d_model, dtype=torch.float64)
    t0 = time.perf_counter()
    dev = next(hf.parameters()).device
    n_batches = math.ceil(len(ids) / batch_size)

    def fold(diffs: dict[str, torch.Tensor], fin_diff: torch.Tensor, m: torch.Tensor) -> None:
        for name in names:
            acc.add(name, diffs[name].cpu(), m)
        tmp = _Acc(first_k, skip_first)
        tmp.add("f", fin_diff.cpu(), m)
        fin_pos.add_(tmp.pos_sum["f"])
        fin_all.add_(tmp.all_sum["f"])
        acc.count(m)

    with torch.no_grad(), progress_bar(n_batches, "lens", disable=not progress) as bar:
        if vectors is not None:
            start = min(get_hook_point(hf, n).layer for n in vectors)
            for x, m in padded_batches(ids, batch_size, pad_id):
                xd, md = x.to(dev), m.to(dev)
                # record() before recording(): it finds the blocks by their place in hf
                with record(hf, names) as r0, recording(hf, start) as prefix:
                    h0 = full_hidden(hf, xd, md)  # [B, L, d_model], final-normed
                later = [n for n in names if get_hook_point(hf, n).layer >= start]
                with record(hf, later) as r1, steer(hf, vectors, coeff=coeff, positions=md.bool()):
                    h1 = prefix_hidden(hf, prefix)  # blocks start.. again, steered
                # a hook before the vectors is unchanged: its difference is diff(base, base)
                diffs = {n: diff(n, r0[n], r1[n] if n in later else r0[n]) for n in names}
                fold(diffs, h1 - h0, m)
                bar.update(1)
        else:
            with _changed_model(hf, finetuned) as (ft, base_ctx):
                for x, m in padded_batches(ids, batch_size, pad_id):
                    xd, md = x.to(dev), m.to(dev)
                    if base_ctx is None:
                        with record(hf, names) as r0:
                            h0 = full_hidden(hf, xd, md)
                        with record(ft, names) as r1:
                            h1 = full_hidden(ft, xd.to(_dev(ft)), md.to(_dev(ft)))
                    else:  # PEFT adapter on hf: base = adapter disabled
                        with base_ctx(), record(ft, names) as r0:
                            h0 = full_hidden(ft, xd, md)
                        with record(ft, names) as r1:
                            h1 = full_hidden(ft, xd, md)
                    fold({n: diff(n, r0[n], r1[n].to(dev)) for n in names}, h1.to(dev) - h0, m)
                    bar.update(1)
    cnt = acc.pos_count.clamp_min(1.0)  # [k]
    n_tok = max(acc.n_tokens, 1)
    return LensResult(
        hooks=names,
        first_k=first_k,
        pos_mean={n: (acc.pos_sum[n] / cnt[:, None]).float() for n in names},
        pos_count=acc.pos_count,
        all_mean={n: (acc.all_sum[n] / n_tok).float() for n in names},
        n_tokens=acc.n_tokens,
        n_texts=len(ids),
        final_pos_mean=(fin_pos / cnt[:, None]).float(),
        final_all_mean=(fin_all / n_tok).float(),
        meta={
            "mode": "vectors" if vectors is not None else "finetuned",
            "coeff": coeff,
            "max_tokens": max_tokens,
            "skip_first": skip_first,
            "corpus": corpus.source,
            "seconds": round(time.perf_counter() - t0, 2),
            "finetuned": str(getattr(finetuned, "spec", finetuned))
            if finetuned is not None
            else None,
            "vectors": dict(getattr(vectors, "metadata", {})) if vectors is not None else None,
        },
    )


def _dev(m: nn.Module) -> torch.device:
    return next(unwrap(m).parameters()).device


@contextmanager
def _changed_model(hf: nn.Module, finetuned) -> Iterator[tuple[nn.Module, object]]:
    if isinstance(finetuned, (str, Path)) and (Path(finetuned) / "adapter_config.json").exists():
        with adapter_context(hf, finetuned) as pm:  # base = the adapter disabled
            yield pm.get_base_model(), pm.disable_adapter
        return
    ft = load_model(finetuned, dtype=hf.dtype) if isinstance(finetuned, (str, Path)) else finetuned
    ft = unwrap(ft)
    if ft.config.hidden_size != hf.config.hidden_size or family_of(ft) != family_of(hf):
        raise LensError(
            f"The finetuned model ({ft.config.model_type}, d_model={ft.config.hidden_size}) does "
            f"not match the base ({hf.config.model_type}, d_model={hf.config.hidden_size})."
        )
    yield ft, None
