"""Activation-difference lens (after Minder, Dumas et al. 2025).

Run a model with and without a change (a VectorSet added to it, or a finetuned model /
LoRA adapter against its base) on diverse text, and average the activation difference
(changed minus base) at chosen hooks:

  (a) per position, for each of the first k token positions (the published method reads
      positions 0-4 separately; averaging over all positions washes the signal out), and
  (b) over all real (non-padding) positions, optionally skipping the first few.

Each mean difference is read through the centred DLA (final-norm scale + centred
unembedding; for a residual-stream difference d this ranks tokens exactly like the
logit lens W_U norm(d), since the norm's 1/rms is a positive scalar), and the mean
difference of the final logits is reported too (top tokens promoted and suppressed).

The final logits are linear in the last hidden state, so the mean logit difference is
computed exactly as W_U @ (mean difference of the final-norm output); no [batch, pos,
vocab] tensor is ever built. (Gemma 2's final logit soft-capping is not applied: these
are the pre-cap logits.)

Batching: texts are sorted by length and right-padded. For a VectorSet, blocks below the
first vector's layer are run once: the base forward records how the model calls each
later block (its input, masks, rotary embeddings), and the changed run replays only the
blocks from the first vector's layer on, with the vectors added at every real token.
For a vector at layer 24 of 30 that is 1.2 forwards per batch instead of 2.
"""

from __future__ import annotations

import csv
import io
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import SteerdiffError
from ..hooks import family_of, final_norm, get_blocks, get_hook_point, record, select_hooks, steer
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text, provenance
from ..models import LoadedModel, load_model, unwrap
from ..vectors import VectorSet, VectorSetError
from .corpus import Corpus, CorpusError, load_corpus
from .dla import DLAError, TokenScore, check_dla_hook, logit_basis, top_tokens


class LensError(SteerdiffError, ValueError):
    """Bad lens arguments (k larger than the texts, no hooks...); the message says why."""


@dataclass
class LensResult:
    """Mean activation differences (changed minus base)."""

    hooks: list[str]
    first_k: int
    pos_mean: dict[str, torch.Tensor]  # hook -> [first_k, dim] mean diff at positions 0..k-1
    pos_count: torch.Tensor  # [first_k] texts that reach each position
    all_mean: dict[str, torch.Tensor]  # hook -> [dim] mean diff over all real positions
    n_tokens: int  # positions averaged in all_mean
    n_texts: int
    final_pos_mean: torch.Tensor  # [first_k, d_model] mean diff of the final-norm output
    final_all_mean: torch.Tensor  # [d_model]
    meta: dict = field(default_factory=dict)

    def logit_diff(self, model: nn.Module | LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean final-logit differences: ([first_k, vocab], [vocab])."""
        w_u = unwrap(model).get_output_embeddings().weight.detach().float()  # [vocab, d]
        return self.final_pos_mean @ w_u.T, self.final_all_mean @ w_u.T

    def read(
        self,
        model: nn.Module | LoadedModel,
        k: int = 20,
        center: bool = True,
        norm_scale: bool = True,
        tokenizer=None,
    ) -> LensReadout:
        """Top/bottom-k tokens of every mean difference (centred DLA) and of the logits."""
        tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        basis = logit_basis(model, center, norm_scale)  # [vocab, d_model]
        d_model = basis.shape[1]
        rows: list[LensRow] = []
        skipped: dict[str, str] = {}
        for hook in self.hooks:
            try:
                check_dla_hook(hook)
            except DLAError as e:
                skipped[hook] = str(e).split(". Read")[0]
                continue
            if self.all_mean[hook].shape[0] != d_model:
                skipped[hook] = f"width {self.all_mean[hook].shape[0]} != d_model"
                continue
            for p in range(self.first_k):
                scores = basis @ self.pos_mean[hook][p]  # [vocab]
                rows.append(_row(hook, str(p), self.pos_mean[hook][p], scores, k, tok))
            scores = basis @ self.all_mean[hook]
            rows.append(_row(hook, "all", self.all_mean[hook], scores, k, tok))
        lp, la = self.logit_diff(model)
        if center:
            lp, la = lp - lp.mean(-1, keepdim=True), la - la.mean()
        logits = [
            _row("logits", str(p), self.final_pos_mean[p], lp[p], k, tok)
            for p in range(self.first_k)
        ]
        logits.append(_row("logits", "all", self.final_all_mean, la, k, tok))
        return LensReadout(rows, logits, skipped, k, center, norm_scale)

    def save(self, path: str | Path) -> Path:
        """Write the mean differences (torch.save, atomic)."""
        buf = io.BytesIO()
        torch.save({k: v for k, v in self.__dict__.items()}, buf)
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> LensResult:
        return cls(**torch.load(path, weights_only=False))


@dataclass
class LensRow:
    hook: str  # a hook name, or "logits" for the final logits
    position: str  # "0".."k-1" or "all"
    diff_norm: float
    top: list[TokenScore]
    bottom: list[TokenScore]


def _row(hook: str, pos: str, diff: torch.Tensor, scores: torch.Tensor, k: int, tok) -> LensRow:
    norm = float(diff.norm())
    if norm == 0.0:  # no difference (e.g. a hook before the vector): no ranking to read
        return LensRow(hook, pos, 0.0, [], [])
    top, bottom = top_tokens(scores, k, tok)
    return LensRow(hook, pos, norm, top, bottom)


@dataclass
class LensReadout:
    rows: list[LensRow]  # one per (hook, position)
    logits: list[LensRow]  # final-logit differences per position and "all"
    skipped: dict[str, str]  # hooks not read through DLA, and why
    k: int
    center: bool
    norm_scale: bool

    def find(self, words: list[str], k: int | None = None) -> list[dict]:
        """Where any of `words` appears (case-insensitive substring of a stripped token) in
        the top-k, in model order (layer, then position), logits last."""
        k = k or self.k
        words = [w.lower() for w in words]
        hits = []
        for r in self.rows + self.logits:
            for rank, t in enumerate(r.top[:k]):
                s = t.token.strip().lower()
                if s and any(w in s for w in words):
                    hits.append(
                        {"hook": r.hook, "position": r.position, "rank": rank + 1, "token": t.token}
                    )
        return hits

    def to_dict(self) -> dict:
        def conv(r: LensRow) -> dict:
            return {
                "hook": r.hook,
                "position": r.position,
                "diff_norm": r.diff_norm,
                "top": [t.__dict__ for t in r.top],
                "bottom": [t.__dict__ for t in r.bottom],
            }

        return {
            "k": self.k,
            "center": self.center,
            "norm_scale": self.norm_scale,
            "rows": [conv(r) for r in self.rows],
            "logits": [conv(r) for r in self.logits],
            "skipped": self.skipped,
        }

    def to_csv(self, n: int = 10) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["hook", "position", "diff_norm", "top_tokens", "bottom_tokens"])
        for r in self.rows + self.logits:
            w.writerow(
                [
                    r.hook,
                    r.position,
                    f"{r.diff_norm:.4g}",
                    " | ".join(t.token for t in r.top[:n]),
                    " | ".join(t.token for t in r.bottom[:n]),
                ]
            )
        return buf.getvalue()


# ----------------------------------------------------------------------------- running


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


def _inner(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (its output is the final-norm output)."""
    return model.get_submodule(family_of(model).blocks.rsplit(".", 1)[0])


def _tokenize(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    enc = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_tokens)
    return [list(ids) for ids in enc["input_ids"]]


def _batches(
    ids: list[list[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded batches (input_ids [B, L], attention_mask [B, L]) in length order."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), batch_size):
        rows = [ids[i] for i in order[s : s + batch_size]]
        L = max(len(r) for r in rows)
        x = torch.full((len(rows), L), pad_id, dtype=torch.long)
        m = torch.zeros((len(rows), L), dtype=torch.long)
        for j, r in enumerate(rows):
            x[j, : len(r)] = torch.tensor(r)
            m[j, : len(r)] = 1
        yield x, m


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


@contextmanager
def _adapter(model: nn.Module, folder: str) -> Iterator[tuple[nn.Module, object]]:
    """Load a PEFT adapter onto the model for the duration; yields (peft model, base ctx)."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(model, folder)
    pm.eval()
    try:
        yield pm.get_base_model(), pm.disable_adapter
    finally:
        pm.unload()  # removes the LoRA layers: the base model is as before


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
    """
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
    corpus = texts if isinstance(texts, Corpus) else load_corpus(texts, n=n_texts)
    if isinstance(texts, Corpus) and n_texts is not None:
        corpus = load_corpus(corpus.texts, n=n_texts)
    if len(corpus) == 0:
        raise CorpusError("The corpus is empty.")
    names = select_hooks(hf, hooks)
    if vectors is not None:
        check_vectors_for(model, vectors)
    ids = _tokenize(tok, corpus.texts, max_tokens)
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

    with torch.no_grad():
        if vectors is not None:
            inner = _inner(hf)
            start = min(get_hook_point(hf, n).layer for n in vectors)
            for b, (x, m) in enumerate(_batches(ids, batch_size, pad_id)):
                xd, md = x.to(dev), m.to(dev)
                with record(hf, names) as r0, _capture_calls(hf, start) as calls:
                    h0 = inner(input_ids=xd, attention_mask=md, use_cache=False).last_hidden_state
                later = [n for n in names if get_hook_point(hf, n).layer >= start]
                with record(hf, later) as r1, steer(hf, vectors, coeff=coeff, positions=md.bool()):
                    h1 = _replay(hf, calls, start)  # [B, L, d_model], final-normed
                diffs = {
                    n: (r1[n] - r0[n]) if n in later else torch.zeros_like(r0[n]) for n in names
                }
                fold(diffs, h1 - h0, m)
                _progress(progress, b, n_batches, t0)
        else:
            with _changed_model(hf, finetuned) as (ft, base_ctx):
                for b, (x, m) in enumerate(_batches(ids, batch_size, pad_id)):
                    xd, md = x.to(dev), m.to(dev)
                    if base_ctx is None:
                        with record(hf, names) as r0:
                            h0 = _inner(hf)(
                                input_ids=xd, attention_mask=md, use_cache=False
                            ).last_hidden_state
                        with record(ft, names) as r1:
                            h1 = _inner(ft)(
                                input_ids=xd.to(_dev(ft)),
                                attention_mask=md.to(_dev(ft)),
                                use_cache=False,
                            ).last_hidden_state
                    else:  # PEFT adapter on hf: base = adapter disabled
                        with base_ctx(), record(ft, names) as r0:
                            h0 = _inner(ft)(
                                input_ids=xd, attention_mask=md, use_cache=False
                            ).last_hidden_state
                        with record(ft, names) as r1:
                            h1 = _inner(ft)(
                                input_ids=xd, attention_mask=md, use_cache=False
                            ).last_hidden_state
                    fold({n: r1[n].to(dev) - r0[n] for n in names}, h1.to(dev) - h0, m)
                    _progress(progress, b, n_batches, t0)
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


@contextmanager
def _capture_calls(model: nn.Module, start: int) -> Iterator[dict[int, tuple[tuple, dict]]]:
    """Record how the HF forward calls decoder blocks start.. (hidden input, masks, rotary
    embeddings...), so the blocks from `start` on can be replayed with the vectors added.
    Blocks below `start` come before every vector: their activations do not change."""
    blocks = get_blocks(model)
    calls: dict[int, tuple[tuple, dict]] = {}
    handles = []

    def grab(j: int):
        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[j] = (args, dict(kwargs))

        return pre

    try:
        for j in range(start, len(blocks)):
            handles.append(blocks[j].register_forward_pre_hook(grab(j), with_kwargs=True))
        yield calls
    finally:
        for h in handles:
            h.remove()


def _replay(model: nn.Module, calls: dict[int, tuple[tuple, dict]], start: int) -> torch.Tensor:
    """Run blocks start.. again from blocks.{start}.hook_resid_pre; return the final-norm output."""
    blocks = get_blocks(model)
    args, kw = calls[start]
    h = args[0] if args else kw["hidden_states"]
    for j in range(start, len(blocks)):
        args, kw = calls[j]
        if args:
            out = blocks[j](h, *args[1:], **kw)
        else:
            out = blocks[j](**{**kw, "hidden_states": h})
        h = out[0] if isinstance(out, tuple) else out
    return final_norm(model)(h)


def _dev(m: nn.Module) -> torch.device:
    return next(unwrap(m).parameters()).device


@contextmanager
def _changed_model(hf: nn.Module, finetuned) -> Iterator[tuple[nn.Module, object]]:
    if isinstance(finetuned, (str, Path)) and (Path(finetuned) / "adapter_config.json").exists():
        with _adapter(hf, str(finetuned)) as pair:
            yield pair
        return
    ft = load_model(finetuned) if isinstance(finetuned, (str, Path)) else finetuned
    ft = unwrap(ft)
    if ft.config.hidden_size != hf.config.hidden_size or family_of(ft) != family_of(hf):
        raise LensError(
            f"The finetuned model ({ft.config.model_type}, d_model={ft.config.hidden_size}) does "
            f"not match the base ({hf.config.model_type}, d_model={hf.config.hidden_size})."
        )
    yield ft, None


def _progress(on: bool, b: int, n: int, t0: float) -> None:
    if on:
        print(f"  lens batch {b + 1}/{n}  {time.perf_counter() - t0:.1f}s", flush=True)


def save_lens(
    out_dir: str | Path,
    result: LensResult,
    readout: LensReadout,
    model: LoadedModel | nn.Module | None = None,
    plot: bool = True,
) -> dict[str, Path]:
    """lens.pt (mean differences), lens.json (tables + provenance), lens.csv, lens_positions.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"pt": result.save(out / "lens.pt")}
    info = {
        "n_texts": result.n_texts,
        "n_tokens": result.n_tokens,
        "first_k": result.first_k,
        "pos_count": result.pos_count.tolist(),
        "meta": result.meta,
        "provenance": provenance(model),
        **readout.to_dict(),
    }
    paths["json"] = atomic_write_json(out / "lens.json", info)
    paths["csv"] = atomic_write_text(out / "lens.csv", readout.to_csv())
    if plot:
        from .plots import lens_table_png

        paths["png"] = lens_table_png(readout, out / "lens_positions.png")
    return paths
