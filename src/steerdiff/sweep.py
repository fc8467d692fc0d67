"""Layer x strength x readout sweeps: where is a trait well approximated by a steering vector?

For a trait system prompt (default: "You love owls...") we extract contrast vectors at
every layer's residual stream (`blocks.{l}.hook_resid_post`) for each readout, then for
every (readout, layer, strength) cell add strength x vector at all positions and measure:

- target_rate: the exact-scorer share of the target candidate (mean over questions);
- off_target: the most chosen other candidate and its share, and the largest rise of
  any other candidate over the unsteered model (off_target_gain);
- kl: coherence, KL(unsteered || steered) of the next-token distributions along fixed
  greedy unsteered responses to neutral prompts (data/neutral_prompts.txt), mean over
  response tokens, in nats.

The best cell is the highest target rate whose off_target_gain and kl stay within bounds.
Inside sweeps the exact scorer uses the first `n_questions` (default 5) of the 50
questions and the KL uses 4 neutral prompts x 12 tokens: a documented subset that keeps
360 cells within minutes on 2 CPU cores. The chosen cell is then re-scored on all 50
questions (`confirm_questions`), unsteered and steered, with 95% CIs.

Speed: with positions "all" (the default) a cell at layer L runs only blocks L+1.. from
the cached unsteered activations (see CachedPrompts), and the unembedding runs only where
a log-prob is read; other positions use the full cached passes of evals.preference.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io as _io
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from . import io
from .chat import chat_texts, read_lines_resource
from .errors import SteerdiffError
from .evals.preference import (
    Category,
    Steering,
    _common_prefix_len,
    _continuation_feeds,
    answer_variants,
    candidate_logprobs,
    continue_forward,
    exact_preference,
    left_pad_remainders,
    load_category,
    prefix_forward,
    question_prompts,
)
from .extract import Exclusion, default_contrast_questions, trait_vectors
from .hooks import final_norm, get_blocks, n_layers
from .models import LoadedModel
from .vectors import VectorSet

HOOK_TEMPLATE = "blocks.{layer}.hook_resid_post"


class SweepError(SteerdiffError, ValueError):
    """A sweep configuration is unusable; the message says how to fix it."""


@dataclass
class SweepConfig:
    target: str = "owl"
    category: str = "animals"  # built-in name or a YAML/JSON category file
    layers: list[int] | None = None  # None: every layer
    strengths: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    readouts: list[str] = field(default_factory=lambda: ["last", "prompt_mean", "response_mean"])
    n_questions: int = 5  # questions of the exact scorer per cell (first n of 50)
    confirm_questions: int = 50  # re-score the best cell on this many questions (0: skip)
    n_contrast: int = 30  # contrast questions (first n of data/contrast_questions.txt)
    n_neutral: int = 4  # neutral prompts for the KL coherence measure
    kl_tokens: int = 12  # greedy unsteered response tokens per neutral prompt
    off_target_bound: float = 0.10  # max rise of any other candidate over unsteered
    kl_bound: float = 0.5  # max KL (nats per token) from the unsteered model
    positions: str = "all"
    exclude_first_n: int = 1
    exclude_norm_ratio: float | None = 8.0
    seed: int = 0

    def check(self, n_model_layers: int) -> None:
        if not self.strengths:
            raise SweepError("strengths is empty; give at least one, e.g. --strengths 1,2,4,8.")
        if not self.readouts:
            raise SweepError(
                "readouts is empty; use e.g. --readouts last,prompt_mean,response_mean."
            )
        bad = [la for la in (self.layers or []) if not 0 <= la < n_model_layers]
        if bad or self.layers == []:
            raise SweepError(
                f"Layers {bad or '[]'} are not valid; the model has layers 0-{n_model_layers - 1}."
            )


@dataclass
class Cell:
    readout: str
    layer: int
    hook: str
    strength: float
    target_rate: float
    off_target: str
    off_target_rate: float
    off_target_gain: float
    kl: float
    vector_norm: float


# ----------------------------------------------------------------------------- partial forwards
#
# A vector added at blocks.{L}.hook_resid_post changes nothing in blocks 0..L: their
# activations and KV caches are the unsteered ones. So the unsteered model runs each cached
# pass (shared prompt prefix, prompt remainders, continuation rows) once, recording every
# decoder block's output and how the HF model called each block (rotary cos/sin, causal
# mask, position ids; see train.compute_prefix). A cell at layer L then replays only
# blocks L+1.. from the recorded resid_post of block L plus coeff x vector, with a KV
# cache that holds only those blocks (blocks <= L are never run, so never read it).


class _KV:
    """A KV cache for replayed blocks; HF attention only calls update()."""

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.kv = dict(kv or {})

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *_args, **_kwargs):
        old = self.kv.get(layer_idx)
        if old is not None:
            k, v = torch.cat([old[0], k], dim=-2), torch.cat([old[1], v], dim=-2)
        self.kv[layer_idx] = (k, v)
        return k, v

    def rows(self, idx: torch.Tensor | int) -> _KV:
        """Row selection (a tensor of row indices) or expansion of a 1-row cache (an int)."""
        if isinstance(idx, int):
            return _KV(
                {
                    j: (k.expand(idx, -1, -1, -1), v.expand(idx, -1, -1, -1))
                    for j, (k, v) in self.kv.items()
                }
            )
        return _KV({j: (k[idx], v[idx]) for j, (k, v) in self.kv.items()})


@dataclass
class _Pass:
    """One recorded unsteered forward: each block's output and call arguments."""

    post: list[torch.Tensor]  # [n_layers] blocks.{j}.hook_resid_post, [b, s, d]
    calls: list[tuple[tuple, dict]]  # [n_layers] (args, kwargs) after hidden_states


@contextlib.contextmanager
def _recording(model: torch.nn.Module, store: dict) -> Iterator[None]:
    blocks = get_blocks(model)
    handles = []
    for j, b in enumerate(blocks):

        def pre(_m, args, kwargs, j=j):
            # the recorded pass's own KV cache is not kept: replays pass their own
            drop = ("hidden_states", "past_key_values", "past_key_value")
            kw = {k: v for k, v in kwargs.items() if k not in drop}
            store.setdefault("calls", {})[j] = (args[1:], kw)

        def post(_m, _args, _kwargs, out, j=j):
            store.setdefault("post", {})[j] = out[0] if isinstance(out, tuple) else out

        handles.append(b.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(b.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _record(model: torch.nn.Module, **forward_kwargs) -> _Pass:
    store: dict = {}
    with _recording(model, store):
        model(**forward_kwargs)
    n = len(get_blocks(model))
    return _Pass([store["post"][j] for j in range(n)], [store["calls"][j] for j in range(n)])


def _head(model: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden [..., d] -> float logits [..., vocab] (gemma's soft-capping too)."""
    logits = model.get_output_embeddings()(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


class CachedPrompts:
    """Unsteered recordings of Q prompts (shared prefix once, then the remainders) and R
    continuation rows (row i continues prompt row_prompt[i]); replays blocks L+1.. for a
    vector added at blocks.{L}.hook_resid_post at every position.

    Matches prefix_forward / continue_forward of the full model (see the tests)."""

    def __init__(
        self,
        lm: LoadedModel,
        prompts: Sequence[Sequence[int]],
        row_prompt: Sequence[int],
        row_tokens: Sequence[Sequence[int]],
    ):
        model, dev = lm.model, lm.device
        self.model, self.blocks, self.norm = model, get_blocks(model), final_norm(model)
        self.n_layers = len(self.blocks)
        self.q = q = len(prompts)
        pad = lm.tokenizer.pad_token_id or 0
        p = _common_prefix_len(prompts)
        self.p = p
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            self.first = None
            if p > 0:
                ids = torch.tensor([list(prompts[0][:p])], device=dev)
                self.first = _record(
                    model, input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1
                )
                cache.batch_repeat_interleave(q)
            ids, rest_mask, pos = left_pad_remainders(prompts, p, pad)
            mask = torch.cat([torch.ones(q, p, dtype=torch.long), rest_mask], dim=1)
            self.second = _record(
                model,
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=pos.to(dev),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            # continuation rows grouped by length: one recorded pass per length, no padding
            self.third: list[tuple[torch.Tensor, _Pass]] = []
            next_pos = torch.tensor([len(r) for r in prompts])
            lengths = sorted({len(t) for t in row_tokens})
            order = [i for n in lengths for i, t in enumerate(row_tokens) if len(t) == n]
            # flat[i, t]: where token t of row i lands in the concatenated output (-1: none)
            width = max(lengths, default=0)
            self.flat = torch.full((len(row_tokens), width), -1, dtype=torch.long)
            at = 0
            for i in order:
                n = len(row_tokens[i])
                self.flat[i, :n] = torch.arange(at, at + n)
                at += n
            base_cache = cache
            for n in lengths:
                rows = [i for i, t in enumerate(row_tokens) if len(t) == n]
                idx = torch.tensor([row_prompt[i] for i in rows], dtype=torch.long)
                ids = torch.tensor([list(row_tokens[i]) for i in rows], dtype=torch.long)
                pos = next_pos[idx].unsqueeze(1) + torch.arange(n)
                cache = copy.deepcopy(base_cache)
                cache.batch_select_indices(idx.to(dev))
                rec = _record(
                    model,
                    input_ids=ids.to(dev),
                    attention_mask=torch.cat(
                        [mask[idx], torch.ones(len(rows), n, dtype=torch.long)], dim=1
                    ).to(dev),
                    position_ids=pos.to(dev),
                    past_key_values=cache,
                    use_cache=True,
                )
                self.third.append((idx, rec))

    def _run(self, rec: _Pass, layer: int, add: torch.Tensor | None, kv: _KV) -> torch.Tensor:
        """Blocks layer+1.. from the recorded resid_post of `layer` (+ add) -> resid_post last."""
        h = rec.post[layer]
        if add is not None:
            h = h + add.to(dtype=h.dtype, device=h.device)
        for j in range(layer + 1, self.n_layers):
            args, kwargs = rec.calls[j]
            out = self.blocks[j](h, *args, **{**kwargs, "past_key_values": kv})
            h = out[0] if isinstance(out, tuple) else out
        return h

    def replay(
        self, layer: int, vector: torch.Tensor | None = None, coeff: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final-normed hidden after blocks.{layer}.hook_resid_post += coeff * vector:
        (each prompt's last token [Q, d], every continuation token [N, d] or None; token t of
        row i is at self.flat[i, t])."""
        add = None if vector is None or coeff == 0.0 else coeff * vector
        with torch.inference_mode():
            kv = _KV()
            if self.first is not None:
                self._run(self.first, layer, add, kv)
                kv = kv.rows(self.q)
            last = self.norm(self._run(self.second, layer, add, kv)[:, -1])
            cont = None
            if self.third:
                cont = torch.cat(
                    [
                        self._run(rec, layer, add, kv.rows(idx)).flatten(0, 1)
                        for idx, rec in self.third
                    ]
                )
                cont = self.norm(cont)
        return last, cont

    def head(self, h: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return _head(self.model, h)


class FastScorer:
    """The exact scorer (candidate_logprobs) for vectors at hook_resid_post, by partial
    forwards; the head runs only at the continuation tokens that score a candidate."""

    def __init__(
        self, lm: LoadedModel, prompts: Sequence[Sequence[int]], candidates: Sequence[str]
    ):
        tok = lm.tokenizer
        owner, forms = [], []
        for ci, c in enumerate(candidates):
            for v in answer_variants(c):
                owner.append(ci)
                forms.append(tok(v, add_special_tokens=False)["input_ids"])
        feeds, which = _continuation_feeds(forms)
        q, n_f = len(prompts), len(feeds)
        self.cached = CachedPrompts(
            lm,
            prompts,
            [r for r in range(q) for _ in feeds],
            [fd for _ in range(q) for fd in feeds],
        )
        self.first_tok = torch.tensor([f[0] for f in forms])
        self.n_forms = len(forms)
        self.cols = [[fi for fi, o in enumerate(owner) if o == ci] for ci in range(len(candidates))]
        q_i, f_i, flat_i, tok_i = [], [], [], []
        if n_f:
            flat = self.cached.flat
            for qq in range(q):
                for fi, f in enumerate(forms):
                    if which[fi] < 0:
                        continue
                    r = qq * n_f + which[fi]
                    for t in range(len(f) - 1):
                        q_i.append(qq)
                        f_i.append(fi)
                        flat_i.append(int(flat[r, t]))
                        tok_i.append(f[t + 1])
        self.gather = tuple(torch.tensor(x, dtype=torch.long) for x in (q_i, f_i, flat_i, tok_i))

    def logprobs(self, layer: int, vector: torch.Tensor | None = None, coeff: float = 0.0):
        """log P(candidate | prompt) under coeff x vector at blocks.{layer}.hook_resid_post
        -> [Q, n_candidates]."""
        last, cont = self.cached.replay(layer, vector, coeff)
        with torch.inference_mode():
            form_lp = torch.log_softmax(self.cached.head(last), -1)[:, self.first_tok]  # [Q, F]
            if cont is not None and len(self.gather[0]):
                q_i, f_i, flat_i, tok_i = self.gather
                lp = torch.log_softmax(self.cached.head(cont), -1)
                form_lp = form_lp.index_put((q_i, f_i), lp[flat_i, tok_i], accumulate=True)
            return torch.stack([torch.logsumexp(form_lp[:, c], dim=1) for c in self.cols], 1)


# ----------------------------------------------------------------------------- coherence


class CoherenceProbe:
    """KL(unsteered || steered) along fixed greedy unsteered responses to neutral prompts."""

    def __init__(self, lm: LoadedModel, prompts: Sequence[str], n_tokens: int = 16):
        if not prompts:
            raise SweepError("The neutral prompt set is empty; give at least one prompt.")
        self.lm = lm
        tok = lm.tokenizer
        texts = chat_texts(tok, prompts, None)
        self.prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        self.responses = [self._greedy(p, n_tokens) for p in self.prompts]
        self.base = self._logprobs(None)  # [K, n_tokens, vocab]

    def _greedy(self, prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt], device=self.lm.device)
        with torch.no_grad():
            out = self.lm.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=self.lm.tokenizer.pad_token_id,
            )
        return out[0, len(prompt) :].tolist()

    def _logprobs(self, steering: Steering | None) -> torch.Tensor:
        """Log-probs [G*K, n, vocab] of the next token at each response position."""
        prefix = prefix_forward(self.lm, self.prompts, steering)
        first = torch.log_softmax(prefix.last_logits, dim=-1).unsqueeze(1)  # [G*K, 1, vocab]
        feeds = [r[:-1] for r in self.responses] * prefix.n_groups
        if not feeds[0]:
            return first
        rest = continue_forward(
            self.lm,
            prefix,
            list(range(len(feeds))),
            feeds,
            lambda logits, rows: torch.log_softmax(logits, dim=-1),
            steering,
        )
        return torch.cat([first, rest], dim=1)

    def kl(self, steering: Steering | None) -> torch.Tensor:
        """KL(unsteered || steered), mean over prompts and tokens -> [G] (one per coeff)."""
        steered = self._logprobs(steering)  # [G*K, n, vocab]
        g = steered.shape[0] // self.base.shape[0]
        base = self.base.repeat(g, 1, 1)
        kl = (base.exp() * (base - steered)).sum(-1)  # [G*K, n]
        return kl.view(g, -1).mean(1)


class FastCoherence:
    """CoherenceProbe.kl for vectors at hook_resid_post, by partial forwards."""

    def __init__(self, probe: CoherenceProbe):
        feeds = [r[:-1] for r in probe.responses]
        rows = list(range(len(feeds))) if feeds[0] else []
        self.cached = CachedPrompts(probe.lm, probe.prompts, rows, feeds if rows else [])
        self.base = self._logprobs(self.cached.n_layers - 1, None, 0.0)

    def _logprobs(self, layer: int, vector, coeff: float) -> torch.Tensor:
        last, cont = self.cached.replay(layer, vector, coeff)
        with torch.inference_mode():
            out = torch.log_softmax(self.cached.head(last), -1).unsqueeze(1)  # [K, 1, vocab]
            if cont is not None:
                rest = torch.log_softmax(self.cached.head(cont), -1)[self.cached.flat]
                out = torch.cat([out, rest], dim=1)
            return out

    def kl(self, layer: int, vector: torch.Tensor, coeff: float) -> float:
        steered = self._logprobs(layer, vector, coeff)
        with torch.inference_mode():
            return float((self.base.exp() * (self.base - steered)).sum(-1).mean())


# ----------------------------------------------------------------------------- sweep


@dataclass
class SweepResult:
    config: SweepConfig
    baseline: dict  # unsteered exact-scorer distribution and target rate
    cells: list[Cell]
    best: Cell | None  # within bounds
    best_unbounded: Cell | None
    vector_meta: dict[str, dict]
    timings: dict[str, float]
    provenance: dict
    vectors: dict[str, VectorSet] = field(default_factory=dict)  # readout -> swept vectors
    confirm: dict | None = None  # the best cell (or best unbounded) on confirm_questions

    def to_dict(self) -> dict:
        return {
            "provenance": self.provenance,
            "config": asdict(self.config),
            "baseline": self.baseline,
            "best": asdict(self.best) if self.best else None,
            "best_unbounded": asdict(self.best_unbounded) if self.best_unbounded else None,
            "confirm": self.confirm,
            "timings": self.timings,
            "vector_meta": self.vector_meta,
            "cells": [asdict(c) for c in self.cells],
        }

    def csv_text(self) -> str:
        buf = _io.StringIO()
        names = list(Cell.__dataclass_fields__)
        w = csv.DictWriter(buf, fieldnames=names)
        w.writeheader()
        for c in self.cells:
            w.writerow(asdict(c))
        return buf.getvalue()

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """sweep.json, sweep.csv, heatmaps (PNG); every file written atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": io.atomic_write_json(out / "sweep.json", self.to_dict()),
            "csv": io.atomic_write_text(out / "sweep.csv", self.csv_text()),
        }
        for r, vs in self.vectors.items():
            paths[f"vectors_{r}"] = vs.save(out / f"vectors_{r}.safetensors")
        for metric in ("target_rate", "kl", "off_target_gain"):
            paths[f"png_{metric}"] = io.atomic_write_bytes(
                out / f"heatmap_{metric}.png", heatmap_png(self, metric)
            )
        return paths


def best_cell(
    cells: Sequence[Cell], off_target_bound: float | None, kl_bound: float | None
) -> Cell | None:
    ok = [
        c
        for c in cells
        if (off_target_bound is None or c.off_target_gain <= off_target_bound)
        and (kl_bound is None or c.kl <= kl_bound)
    ]
    return max(ok, key=lambda c: c.target_rate) if ok else None


def heatmap_png(result: SweepResult, metric: str) -> bytes:
    """One panel per readout: layers (rows) x strengths (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result.config
    readouts = list(dict.fromkeys(c.readout for c in result.cells))
    layers = sorted({c.layer for c in result.cells})
    strengths = sorted({c.strength for c in result.cells})
    fig, axes = plt.subplots(
        1,
        len(readouts),
        figsize=(2.2 + 1.6 * len(readouts) * max(1, len(strengths) / 3), 2.6 + 0.22 * len(layers)),
        squeeze=False,
    )
    vals = [getattr(c, metric) for c in result.cells]
    vmin, vmax = min(vals), max(vals)
    for ax, r in zip(axes[0], readouts, strict=True):
        grid = torch.full((len(layers), len(strengths)), float("nan"))
        for c in result.cells:
            if c.readout == r:
                grid[layers.index(c.layer), strengths.index(c.strength)] = getattr(c, metric)
        im = ax.imshow(
            grid.numpy(), aspect="auto", origin="lower", vmin=vmin, vmax=vmax, cmap="viridis"
        )
        ax.set_title(r, fontsize=9)
        ax.set_xticks(range(len(strengths)), [f"{s:g}" for s in strengths], fontsize=7)
        ax.set_yticks(range(len(layers)), [str(la) for la in layers], fontsize=6)
        ax.set_xlabel("strength", fontsize=8)
        if result.best and result.best.readout == r:
            ax.plot(
                strengths.index(result.best.strength), layers.index(result.best.layer), "r*", ms=10
            )
    axes[0][0].set_ylabel("layer (hook_resid_post)", fontsize=8)
    fig.subplots_adjust(top=0.8, bottom=0.15)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    base = result.baseline.get("target_rate") if metric == "target_rate" else None
    note = f" (unsteered {base:.3f})" if base is not None else ""
    fig.suptitle(
        f"{metric}{note}, target {cfg.target!r}; star: best within bounds", fontsize=9, y=0.98
    )
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _distribution(
    lm: LoadedModel, prompts, cat: Category, steering: Steering | None
) -> torch.Tensor:
    """Exact-scorer candidate shares, mean over questions -> [G, n_candidates]."""
    lp = candidate_logprobs(lm, prompts, cat.candidates, steering)  # [G, Q, C]
    return torch.softmax(lp, dim=-1).mean(1)


def _cell(r, layer, hook, s, dist, base, ti, cat, kl, norm) -> Cell:
    """dist, base: [C] candidate shares steered / unsteered; ti: target index."""
    others = dist.clone()
    others[ti] = -1.0
    oi = int(others.argmax())
    gain = dist - base
    gain[ti] = -1.0
    return Cell(
        r,
        layer,
        hook,
        s,
        float(dist[ti]),
        cat.candidates[oi],
        float(dist[oi]),
        float(gain.max()),
        kl,
        norm,
    )


def run_sweep(
    lm: LoadedModel, config: SweepConfig | None = None, progress: bool = True
) -> SweepResult:
    """Extract trait vectors and score every (readout, layer, strength) cell."""
    from tqdm.auto import tqdm

    cfg = config or SweepConfig()
    n_model = n_layers(lm.model)
    cfg.check(n_model)
    layers = cfg.layers if cfg.layers is not None else list(range(n_model))
    cat = load_category(cfg.category)
    names = [c.lower() for c in cat.candidates]
    if cfg.target.lower() not in names:
        raise SweepError(
            f"Target {cfg.target!r} is not a candidate of {cfg.category!r}: {cat.candidates}."
        )
    ti = names.index(cfg.target.lower())
    timings: dict[str, float] = {}

    t0, c0 = time.perf_counter(), time.process_time()
    prompts = question_prompts(lm, cat.questions[: cfg.n_questions], None)
    base = _distribution(lm, prompts, cat, None)[0]
    probe = CoherenceProbe(
        lm, read_lines_resource("neutral_prompts.txt")[: cfg.n_neutral], cfg.kl_tokens
    )
    timings["baseline_s"] = time.perf_counter() - t0
    timings["baseline_cpu_s"] = time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    hooks = [HOOK_TEMPLATE.format(layer=la) for la in layers]
    sets: dict[str, VectorSet] = trait_vectors(
        lm,
        cfg.target,
        cat.name,
        cfg.readouts,
        hooks,
        questions=default_contrast_questions()[: cfg.n_contrast],
        exclude=Exclusion(cfg.exclude_first_n, cfg.exclude_norm_ratio),
        seed=cfg.seed,
    )
    timings["extract_s"] = time.perf_counter() - t0
    timings["extract_cpu_s"] = time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    cells: list[Cell] = []
    grid = [(r, la) for r in cfg.readouts for la in layers]
    bar = tqdm(
        total=len(grid) * len(cfg.strengths), desc=f"sweep {cfg.target}", disable=not progress
    )
    # positions "all": partial forwards from the steered layer (see CachedPrompts); other
    # positions: the full cached model passes, all strengths of one vector batched.
    fast = cfg.positions == "all"
    if fast:
        scorer, coherence = FastScorer(lm, prompts, cat.candidates), FastCoherence(probe)
    for r, la in grid:
        hook = HOOK_TEMPLATE.format(layer=la)
        v = sets[r][hook]
        if fast:
            dists = [torch.softmax(scorer.logprobs(la, v, s), -1).mean(0) for s in cfg.strengths]
            kls = [coherence.kl(la, v, s) for s in cfg.strengths]
        else:
            steering = Steering({hook: v}, coeff=list(cfg.strengths), positions=cfg.positions)
            dists, kls = _distribution(lm, prompts, cat, steering), probe.kl(steering)
        for s, dist, kl in zip(cfg.strengths, dists, kls, strict=True):
            cells.append(_cell(r, la, hook, s, dist, base, ti, cat, float(kl), float(v.norm())))
        bar.update(len(cfg.strengths))
    bar.close()
    timings["cells_s"] = time.perf_counter() - t0
    timings["cells_cpu_s"] = time.process_time() - c0
    timings["per_cell_s"] = timings["cells_s"] / max(len(cells), 1)

    baseline = {
        "target_rate": float(base[ti]),
        "distribution": dict(zip(cat.candidates, base.tolist(), strict=True)),
        "n_questions": len(prompts),
    }
    meta = {
        r: {k: v for k, v in vs.metadata.items() if k not in ("hooks", "pca_explained")}
        for r, vs in sets.items()
    }
    best = best_cell(cells, cfg.off_target_bound, cfg.kl_bound)
    t0, c0 = time.perf_counter(), time.process_time()
    confirm = _confirm(lm, cfg, cat, best or best_cell(cells, None, None), sets)
    timings["confirm_s"] = time.perf_counter() - t0
    timings["confirm_cpu_s"] = time.process_time() - c0
    return SweepResult(
        config=cfg,
        baseline=baseline,
        cells=cells,
        best=best,
        best_unbounded=best_cell(cells, None, None),
        vector_meta=meta,
        timings=timings,
        provenance=io.provenance(lm, config=asdict(cfg), seed=cfg.seed),
        vectors=sets,
        confirm=confirm,
    )


def _confirm(lm, cfg: SweepConfig, cat: Category, cell: Cell | None, sets) -> dict | None:
    """Exact scorer on confirm_questions questions, unsteered and at the chosen cell."""
    if cell is None or cfg.confirm_questions <= 0:
        return None
    n = cfg.confirm_questions
    steering = Steering({cell.hook: sets[cell.readout][cell.hook]}, cell.strength, cfg.positions)
    base = exact_preference(lm, cfg.target, cat, n_questions=n)
    steered = exact_preference(lm, cfg.target, cat, n_questions=n, steering=steering)
    return {
        "cell": asdict(cell),
        "n_questions": steered.n_questions,
        "unsteered": {"target_rate": base.target_rate, "ci95": base.ci95},
        "steered": {
            "target_rate": steered.target_rate,
            "ci95": steered.ci95,
            "distribution": steered.distribution,
        },
    }
