"""Monitoring: project activations onto a vector, per token, for texts or chat transcripts.

projection[token] = h[token] . v / |v| at the vector's hook point (read after any steering).
Each text gets a summary (mean and max over its counted tokens: for chat rows the
assistant tokens by default, for plain text all tokens but the first `skip_first`, whose
activations are massive in many models). Rows are flagged as pushing toward the trait
when their mean projection is more than `flag_z` standard deviations above a reference:
the mean/std of a baseline set of texts if given, else of the rows themselves.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..chat import render_chat
from ..errors import SteerdiffError
from ..hooks import get_hook_point, record
from ..io import read_jsonl
from ..models import LoadedModel, unwrap
from ..replay import full_hidden
from ..vectors import VectorSet, VectorSetError


class MonitorError(SteerdiffError, ValueError):
    """Bad monitoring input; the message says why."""


@dataclass
class TextProjection:
    index: int
    tokens: list[str]
    values: list[float]  # projection per token
    counted: list[bool]  # tokens included in the summary
    mean: float
    max: float
    z: float = 0.0
    flagged: bool = False


@dataclass
class MonitorResult:
    hook: str
    items: list[TextProjection]
    reference_mean: float
    reference_std: float
    flag_z: float
    meta: dict = field(default_factory=dict)

    @property
    def flagged(self) -> list[int]:
        return [it.index for it in sorted(self.items, key=lambda t: -t.z) if it.flagged]

    def summary(self) -> list[dict]:
        return [
            {
                "index": it.index,
                "mean": it.mean,
                "max": it.max,
                "z": it.z,
                "flagged": it.flagged,
                "n_tokens": int(sum(it.counted)),
            }
            for it in self.items
        ]

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["index", "mean", "max", "z", "flagged", "n_tokens"])
        w.writeheader()
        for row in self.summary():
            w.writerow(row)
        return buf.getvalue()

    def to_dict(self, per_token: bool = True) -> dict:
        d = {
            "hook": self.hook,
            "reference_mean": self.reference_mean,
            "reference_std": self.reference_std,
            "flag_z": self.flag_z,
            "flagged": self.flagged,
            "summary": self.summary(),
            "meta": self.meta,
        }
        if per_token:
            d["tokens"] = [
                {"index": it.index, "tokens": it.tokens, "values": it.values} for it in self.items
            ]
        return d


Row = str | dict


def load_rows(path: str | Path) -> list[Row]:
    """Rows from .jsonl (objects with "messages" or "text"), or .txt (one text per line)."""
    p = Path(path)
    if not p.exists():
        raise MonitorError(f"File not found: {p}")
    if p.suffix == ".jsonl":
        rows: list[Row] = []
        for r in read_jsonl(p):
            if "messages" in r:
                rows.append(r)
            elif isinstance(r.get("text"), str):
                rows.append(r["text"])
            else:
                raise MonitorError(f"{p}: a row has neither 'messages' nor 'text'.")
        return rows
    return [line for line in p.read_text().splitlines() if line.strip()]


def _render(tok, row: Row, role: str) -> tuple[str, list[tuple[int, int]] | None]:
    """Text to tokenize and, for chats, the character spans of `role` messages."""
    if isinstance(row, str):
        return row, None
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise MonitorError("A chat row needs a non-empty 'messages' list.")
    text = render_chat(tok, msgs, add_generation_prompt=False)  # the one chat fallback
    spans, cur = [], 0
    for m in msgs:
        c = str(m.get("content", ""))
        at = text.find(c, cur) if c else -1
        if at < 0:
            continue
        if role == "all" or m.get("role") == role:
            spans.append((at, at + len(c)))
        cur = at + len(c)
    return text, spans


def _unit_vector(model: nn.Module, vector, hook: str | None) -> tuple[str, torch.Tensor]:
    if isinstance(vector, Mapping):
        if isinstance(vector, VectorSet):
            vector.check_fits(model)
        if hook is None:
            if len(vector) != 1:
                raise MonitorError(f"The set has {len(vector)} hooks; say which with hook=...")
            hook = next(iter(vector))
        if hook not in vector:
            raise MonitorError(f"Hook {hook} is not in the set ({', '.join(vector)})")
        v = vector[hook]
    else:
        if hook is None:
            raise MonitorError("Say at which hook the vector is read (hook=...).")
        v = vector
    hp = get_hook_point(model, hook)
    if tuple(v.shape) != (hp.dim,):
        raise VectorSetError(
            f"Vector has shape {tuple(v.shape)} but {hook} has width {hp.dim} on this model."
        )
    v = v.detach().float()
    if float(v.norm()) == 0:
        raise MonitorError("The vector is zero; projections would be undefined.")
    return hook, v / v.norm()


def project(
    model: LoadedModel | nn.Module,
    vector: torch.Tensor | Mapping[str, torch.Tensor],
    rows: list[Row] | str | Path,
    hook: str | None = None,
    role: str = "assistant",
    skip_first: int = 1,
    flag_z: float = 2.0,
    baseline: list[Row] | None = None,
    batch_size: int = 16,
    max_tokens: int = 512,
    tokenizer=None,
) -> MonitorResult:
    """Per-token projections of activations at `hook` onto `vector`, summaries, flags.

    rows: texts and/or chat rows ({"messages": [...]}) or a .jsonl/.txt path.
    role: which chat messages count in the summary ("assistant", "user", "all").
    baseline: reference rows (e.g. neutral text) for the z-scores; default the rows.
    """
    hf = unwrap(model)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise MonitorError("Monitoring needs a tokenizer: pass a LoadedModel or tokenizer=...")
    if isinstance(rows, (str, Path)):
        rows = load_rows(rows)
    if not rows:
        raise MonitorError("No rows to monitor.")
    hook, unit = _unit_vector(hf, vector, hook)
    items = _project_rows(hf, tok, unit, hook, rows, role, skip_first, batch_size, max_tokens)
    ref_items = (
        items
        if baseline is None
        else _project_rows(hf, tok, unit, hook, baseline, role, skip_first, batch_size, max_tokens)
    )
    means = torch.tensor([it.mean for it in ref_items if sum(it.counted) > 0])
    if means.numel() == 0:
        raise MonitorError("No row has tokens to count (wrong role?).")
    mu = float(means.mean())
    sd = float(means.std()) if means.numel() > 1 else 0.0
    for it in items:
        it.z = (it.mean - mu) / sd if sd > 0 else 0.0
        it.flagged = it.z > flag_z and sum(it.counted) > 0
    return MonitorResult(
        hook,
        items,
        mu,
        sd,
        flag_z,
        {
            "role": role,
            "skip_first": skip_first,
            "baseline": "given" if baseline else "rows",
            "n_rows": len(rows),
        },
    )


def _project_rows(
    hf: nn.Module,
    tok,
    unit: torch.Tensor,
    hook: str,
    rows: list[Row],
    role: str,
    skip_first: int,
    batch_size: int,
    max_tokens: int,
) -> list[TextProjection]:
    rendered = [_render(tok, r, role) for r in rows]
    out: list[TextProjection | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rendered[i][0]))
    dev = next(hf.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        encs = []
        for i in idx:
            text, spans = rendered[i]
            chat = spans is not None
            e = tok(
                text,
                # a chat template writes its own <bos>; plain text and the fallback get the
                # tokenizer's special tokens (Gemma's <bos>)
                add_special_tokens=not (
                    chat and text.startswith(getattr(tok, "bos_token", None) or "\0")
                ),
                truncation=True,
                max_length=max_tokens,
                return_offsets_mapping=chat,
            )
            encs.append(e)
        L = max(len(e["input_ids"]) for e in encs)
        x = torch.full((len(idx), L), pad_id, dtype=torch.long)
        m = torch.zeros((len(idx), L), dtype=torch.long)
        for j, e in enumerate(encs):
            n = len(e["input_ids"])
            x[j, :n] = torch.tensor(e["input_ids"])
            m[j, :n] = 1
        with torch.no_grad(), record(hf, hook) as rec:
            full_hidden(hf, x.to(dev), m.to(dev))
        proj = (rec[hook].float() @ unit.to(dev)).cpu()  # [B, L]
        for j, i in enumerate(idx):
            ids = encs[j]["input_ids"]
            n = len(ids)
            vals = proj[j, :n].tolist()
            spans = rendered[i][1]
            if spans is None:
                counted = [p >= skip_first for p in range(n)]
            else:
                offs = encs[j]["offset_mapping"]
                counted = [any(a < e2 and b > s2 for s2, e2 in spans) and b > a for a, b in offs]
            sel = [v for v, c in zip(vals, counted, strict=False) if c]
            out[i] = TextProjection(
                index=i,
                tokens=[tok.decode([t]) for t in ids],
                values=vals,
                counted=counted,
                mean=sum(sel) / len(sel) if sel else float("nan"),
                max=max(sel) if sel else float("nan"),
            )
    return out  # type: ignore[return-value]


def save_monitor(
    out_dir: str | Path, result: MonitorResult, model=None, plot: bool = True, n_strips: int = 8
) -> dict[str, Path]:
    """monitor.json (per-token values, summary, provenance), monitor.csv, monitor_strips.png."""
    from ..io import atomic_write_json, atomic_write_text, provenance

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": atomic_write_json(
            out / "monitor.json", {**result.to_dict(), "provenance": provenance(model)}
        ),
        "csv": atomic_write_text(out / "monitor.csv", result.to_csv()),
    }
    if plot:
        from .plots import projection_strips_png

        top = sorted(result.items, key=lambda t: -t.z)[:n_strips]
        paths["png"] = projection_strips_png(top, out / "monitor_strips.png", result.hook)
    return paths
