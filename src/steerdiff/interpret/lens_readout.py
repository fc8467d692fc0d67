"""Results of the activation-difference lens: the mean differences (LensResult), their
readout through the centred DLA and the logits (LensReadout), and the saved files.

A mean difference is read through the centred DLA (final-norm scale + centred
unembedding; for a residual-stream difference d this ranks tokens exactly like the
logit lens W_U norm(d), since the norm's 1/rms is a positive scalar). The final logits
are linear in the last hidden state, so the mean logit difference is computed exactly as
W_U @ (mean difference of the final-norm output); no [batch, pos, vocab] tensor is ever
built. (Gemma 2's final logit soft-capping is not applied: these are the pre-cap logits.)
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text, provenance
from ..models import LoadedModel, unwrap
from .dla import DLAError, TokenScore, check_dla_hook, logit_basis, top_tokens


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
        w_u = unwrap(model).get_output_embeddings().weight.detach().float().cpu()  # [vocab, d]
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
        basis = logit_basis(model, center, norm_scale).cpu()  # [vocab, d_model], as the means
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
