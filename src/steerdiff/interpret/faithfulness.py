"""Faithfulness: do the vectors do what the finetune does, on text neither was trained on?

Given the base model, a finetune of it (a PEFT LoRA adapter folder or full finetuned
weights) and a vector set fitted to the same data, on a diverse corpus (by default the
offline corpus, interpret.corpus.load_corpus()):

  - per-token KL(finetune || base), KL(vectors || base) and KL(finetune || vectors) of the
    next-token distributions, each a mean over all real tokens with a 95% interval: a
    percentile bootstrap over *texts* (tokens within a text are correlated, so texts are
    the units resampled; the statistic is the token-weighted mean of the resample);
  - the fraction of the finetune's KL to base that the vectors explain,
    1 - KL(finetune || vectors) / KL(finetune || base), with the same bootstrap (both KLs
    come from the same tokens of each resample, so it is a ratio of per-text sums);
  - per layer, the cosine between the finetune's and the vectors' mean activation
    differences from base (interpret.lens.activation_difference_lens), over the first k
    positions (the [k, d] means as one vector) and over all positions.

`vectors_b=` compares two vector sets instead (fitted with other seeds or at other hooks
on the same data): the second one takes the finetune's place.

    res = faithfulness(lm, finetuned="runs/lora", vectors=VectorSet.load("v.safetensors"))
    res.fraction_explained, res.cos_all, res.to_dict()
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import SteerdiffError
from ..hooks import get_hook_point
from ..intervals import bootstrap_ci
from ..models import LoadedModel, unwrap
from .batching import tokenize_texts
from .corpus import Corpus, as_corpus
from .lens import activation_difference_lens, check_vectors_for
from .lens_readout import LensResult
from .variants import ModelContext, base_context, resolve_finetune, token_kls, vector_context

CI_METHOD = (
    "95% percentile bootstrap over texts ({n_boot} resamples, seed {seed}) of the "
    "token-weighted mean; tokens within a text are not treated as independent"
)


class FaithfulnessError(SteerdiffError, ValueError):
    """Bad faithfulness arguments; the message says what to pass instead."""


@dataclass
class KL:
    """A per-token KL: mean over all real tokens, and its 95% interval over texts."""

    mean: float
    ci95: tuple[float, float]


@dataclass
class FaithfulnessResult:
    """What `faithfulness` measured. "reference" is the finetune, or the second vector set
    when two vector sets are compared (reference_kind says which)."""

    reference_kind: str  # "finetune" or "vectors_b"
    reference: str  # the finetune's folder / spec, or vector set B's description
    vectors: str
    kl_finetune_base: KL
    kl_vectors_base: KL
    kl_finetune_vectors: KL
    fraction_explained: float | None  # 1 - KL(ft||vec) / KL(ft||base); None if KL(ft||base)=0
    fraction_explained_ci: tuple[float, float] | None
    hooks: list[str]
    layers: list[int]
    cos_first_k: list[float | None]  # per hook: cosine of the [first_k, d] mean differences
    cos_all: list[float | None]  # per hook: cosine of the all-position mean differences
    cos_per_position: list[list[float | None]]  # per hook, per position 0..first_k-1
    norm_ratio_all: list[float | None]  # per hook: |vectors diff| / |finetune diff|
    first_k: int
    n_texts: int
    n_tokens: int
    corpus: str
    ci_method: str
    task_eval: dict | None = None  # the task's own eval, finetune and vectors side by side
    heldout: dict | None = None  # held-out task loss: base, finetune, vectors, gap closed
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        """The headline figures, one per line (what `steerdiff read faithfulness` prints)."""
        ref = "finetune" if self.reference_kind == "finetune" else "vectors B"

        def kl(name: str, k: KL) -> str:
            return (
                f"{name:<28} {k.mean:.4g} nats/token  (95% CI {k.ci95[0]:.4g} .. {k.ci95[1]:.4g})"
            )

        lines = [
            kl(f"KL({ref} || base)", self.kl_finetune_base),
            kl("KL(vectors || base)", self.kl_vectors_base),
            kl(f"KL({ref} || vectors)", self.kl_finetune_vectors),
        ]
        if self.fraction_explained is None:
            lines.append("fraction explained: undefined (the reference does not differ from base)")
        else:
            lo, hi = self.fraction_explained_ci or (float("nan"), float("nan"))
            lines.append(
                f"fraction of KL({ref} || base) the vectors explain: "
                f"{self.fraction_explained:.3f}  (95% CI {lo:.3f} .. {hi:.3f})"
            )
        lines.append(
            f"cosine of mean activation differences per layer (first {self.first_k} / all):"
        )
        for layer, a, b in zip(self.layers, self.cos_first_k, self.cos_all, strict=True):
            lines.append(f"  layer {layer:>3}: {_fmt(a)} / {_fmt(b)}")
        lines.append(f"({self.n_texts} texts, {self.n_tokens} tokens; {self.corpus})")
        return lines


def _fmt(x: float | None) -> str:
    return "  n/a" if x is None else f"{x:+.3f}"


def _cos(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Cosine of two differences (float64); None when either is exactly zero."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return None
    return float(a @ b) / (na * nb)


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float | None:
    nb = float(b.double().norm())
    return None if nb == 0.0 else float(a.double().norm()) / nb


def _kl_stat(sums: torch.Tensor, counts: torch.Tensor, n_boot: int, seed: int) -> KL:
    s, c = sums.numpy(), counts.numpy()
    mean = float(s.sum() / max(c.sum(), 1.0))
    if len(s) < 2:
        return KL(mean, (mean, mean))
    ci, _ = bootstrap_ci(
        lambda x, n: float(x.sum() / n.sum()),
        s,
        c,
        n_boot=n_boot,
        seed=seed,
        error=FaithfulnessError,
    )
    return KL(mean, ci)


def fraction_explained(
    kl_ft_vec: torch.Tensor | np.ndarray,
    kl_ft_base: torch.Tensor | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float | None, tuple[float, float] | None]:
    """1 - KL(ft||vec) / KL(ft||base) from per-text KL sums over the same tokens, and its
    percentile bootstrap interval over texts. (None, None) if KL(ft||base) is 0."""
    fv, fb = np.asarray(kl_ft_vec, dtype=np.float64), np.asarray(kl_ft_base, dtype=np.float64)
    if fb.sum() <= 0.0:
        return None, None
    value = float(1.0 - fv.sum() / fb.sum())
    if len(fv) < 2:
        return value, (value, value)

    def stat(a: np.ndarray, b: np.ndarray) -> float:
        return float(1.0 - a.sum() / b.sum()) if b.sum() > 0 else float("nan")

    ci, _ = bootstrap_ci(stat, fv, fb, n_boot=n_boot, seed=seed, error=FaithfulnessError)
    return value, ci


def _describe_vectors(v: Mapping[str, torch.Tensor], label: str | None) -> str:
    if label:
        return label
    meta = getattr(v, "metadata", {}) or {}
    return str(
        meta.get("path") or meta.get("name") or f"{len(v)} vectors at {', '.join(sorted(v))}"
    )


def faithfulness(
    lm: LoadedModel,
    finetuned: Any = None,
    vectors: Mapping[str, torch.Tensor] | None = None,
    texts: Corpus | list[str] | str | None = None,
    *,
    vectors_b: Mapping[str, torch.Tensor] | None = None,
    coeff: float = 1.0,
    coeff_b: float = 1.0,
    hooks: str | list[str] = "blocks.*.hook_resid_post",
    first_k: int = 5,
    max_tokens: int = 64,
    n_texts: int | None = None,
    skip_first: int = 0,
    batch_size: int = 8,
    n_boot: int = 2000,
    seed: int = 0,
    labels: tuple[str | None, str | None] = (None, None),
    tokenizer: Any = None,
    progress: bool = False,
) -> FaithfulnessResult:
    """Compare `vectors` (added with `coeff` at every token) with a finetune of `lm`.

    finetuned: a PEFT adapter folder, a finetuned model folder or spec, a LoadedModel /
      HF model, or a fit.FinetuneResult of a full finetune; or give vectors_b= (another
      vector set, with coeff_b) instead, to compare two vector sets.
    texts: a Corpus, strings, or a corpus spec (None = the offline default corpus);
      n_texts: a seeded subset; max_tokens: tokens per text (KL and lens alike).
    hooks / first_k / skip_first: as interpret.lens.activation_difference_lens.
    labels: how to name (reference, vectors) in the result (default: from metadata).
    """
    hf = unwrap(lm)
    tok = tokenizer if tokenizer is not None else getattr(lm, "tokenizer", None)
    if tok is None:
        raise FaithfulnessError("Faithfulness needs a tokenizer: pass a LoadedModel or tokenizer=.")
    if vectors is None:
        raise FaithfulnessError("Give vectors=... (the vector set to compare with the finetune).")
    if (finetuned is None) == (vectors_b is None):
        raise FaithfulnessError(
            "Give exactly one of finetuned=... (an adapter folder or finetuned model) or "
            "vectors_b=... (a second vector set to compare with)."
        )
    check_vectors_for(lm, vectors)
    corpus = as_corpus(texts, n_texts, seed)
    ids = [x for x in tokenize_texts(tok, corpus.texts, max_tokens) if x]
    if not ids:
        raise FaithfulnessError("Every text tokenized to zero tokens; pass longer texts.")

    if vectors_b is not None:
        check_vectors_for(lm, vectors_b)
        ref_ctx: ModelContext = vector_context(lm, vectors_b, coeff_b)
        lens_ref = {"vectors": vectors_b, "coeff": coeff_b}
        ref_kind, ref_name = "vectors_b", _describe_vectors(vectors_b, labels[0])
    else:
        if getattr(finetuned, "kind", None) == "full" and getattr(finetuned, "model", None):
            finetuned = finetuned.model  # an in-memory full finetune (fit.FinetuneResult)
        ft = resolve_finetune(lm, finetuned)
        if ft.lens_arg is None:
            raise FaithfulnessError(
                "An in-memory LoRA cannot be read by the lens: save it (fit_lora(out_dir=DIR)) "
                "and pass finetuned=DIR."
            )
        ref_ctx, lens_ref = ft.context, {"finetuned": ft.lens_arg}
        ref_kind, ref_name = "finetune", labels[0] or ft.spec
    contexts = {
        "base": lambda: base_context(lm),
        "vec": vector_context(lm, vectors, coeff),
        "ref": ref_ctx,
    }
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    pairs = [("ref", "base"), ("vec", "base"), ("ref", "vec")]
    sums, counts = token_kls(contexts, pairs, ids, batch_size, pad, progress=progress)
    frac, frac_ci = fraction_explained(sums[("ref", "vec")], sums[("ref", "base")], n_boot, seed)

    lens_kw = dict(
        hooks=hooks,
        first_k=first_k,
        max_tokens=max_tokens,
        batch_size=batch_size,
        skip_first=skip_first,
        tokenizer=tok,
        progress=progress,
    )
    a = activation_difference_lens(lm, corpus, **lens_ref, **lens_kw)  # type: ignore[arg-type]
    b = activation_difference_lens(lm, corpus, vectors=vectors, coeff=coeff, **lens_kw)
    return _result(
        a,
        b,
        hf,
        sums,
        counts,
        frac,
        frac_ci,
        n_boot,
        seed,
        reference_kind=ref_kind,
        reference=ref_name,
        vectors=_describe_vectors(vectors, labels[1]),
        corpus=corpus.source,
        meta={
            "coeff": coeff,
            "coeff_b": coeff_b if vectors_b is not None else None,
            "max_tokens": max_tokens,
            "skip_first": skip_first,
            "seed": seed,
        },
    )


def _result(
    a: LensResult,
    b: LensResult,
    hf: torch.nn.Module,
    sums: dict,
    counts: torch.Tensor,
    frac: float | None,
    frac_ci: tuple[float, float] | None,
    n_boot: int,
    seed: int,
    **kw: Any,
) -> FaithfulnessResult:
    hooks = list(a.hooks)
    k = a.first_k
    return FaithfulnessResult(
        kl_finetune_base=_kl_stat(sums[("ref", "base")], counts, n_boot, seed),
        kl_vectors_base=_kl_stat(sums[("vec", "base")], counts, n_boot, seed),
        kl_finetune_vectors=_kl_stat(sums[("ref", "vec")], counts, n_boot, seed),
        fraction_explained=frac,
        fraction_explained_ci=frac_ci,
        hooks=hooks,
        layers=[get_hook_point(hf, h).layer for h in hooks],
        cos_first_k=[_cos(a.pos_mean[h], b.pos_mean[h]) for h in hooks],
        cos_all=[_cos(a.all_mean[h], b.all_mean[h]) for h in hooks],
        cos_per_position=[
            [_cos(a.pos_mean[h][p], b.pos_mean[h][p]) for p in range(k)] for h in hooks
        ],
        norm_ratio_all=[_ratio(b.all_mean[h], a.all_mean[h]) for h in hooks],
        first_k=k,
        n_texts=int(len(counts)),
        n_tokens=int(counts.sum()),
        ci_method=CI_METHOD.format(n_boot=n_boot, seed=seed),
        **kw,
    )


__all__ = [
    "KL",
    "FaithfulnessError",
    "FaithfulnessResult",
    "faithfulness",
    "fraction_explained",
]
