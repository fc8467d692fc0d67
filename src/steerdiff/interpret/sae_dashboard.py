"""A small dashboard per SAE latent: where it fires on corpus text and what it writes.

For each chosen latent, over corpus texts (default: the offline corpus):

  snippets     the top-activating texts (one snippet per text, its maximum; texts where
               the latent never fires are left out): a window of
               tokens around the max (up to n_tokens in all: three quarters before it, a
               quarter after), the tokens as strings, `pos` the max's index in the window,
               `value` the max, `values` the latent's activation at every token shown
               (for shading);
  frac_active  the share of real tokens where the latent is > 0, and
  mean_active  its mean where it is;
  dla_top / dla_bottom  the decoder direction's centred DLA (interpret.dla, with the final
               norm's scale): the tokens the latent promotes and suppresses directly
               (empty, with a note in `dla_note`, at hooks outside the residual stream).

Positions before `skip_first` (default 1: the first token, whose activations are massive in
most models) are left out of the statistics and the snippets' maxima.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..hooks import record
from ..models import LoadedModel, unwrap
from ..progress import progress as progress_bar
from ..sae import SAE, check_fits
from .batching import padded_batches, tokenize_texts
from .corpus import Corpus, CorpusError, as_corpus
from .dla import DLAError, check_dla_hook, dla_scores, logit_basis, token_strings, top_tokens
from .sae_effects import sae_on


@dataclass
class LatentDashboard:
    latent: int
    snippets: list[
        dict
    ]  # {"tokens": [str], "pos": int, "value": float, "values": [float], "text": int}
    dla_top: list[dict]  # {"token": str, "token_id": int, "score": float}
    dla_bottom: list[dict]
    frac_active: float
    mean_active: float
    dla_note: str = ""
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> LatentDashboard:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _dla(lm, sae: SAE, latents: list[int], k: int) -> tuple[dict[int, tuple], str]:
    """Top/bottom DLA tokens of each latent's decoder direction, or a note why none."""
    try:
        check_dla_hook(str(sae.hook))
    except DLAError as e:
        return {}, str(e).split(". Read")[0]
    tok = getattr(lm, "tokenizer", None)
    basis = logit_basis(lm, center=True, norm_scale=True)
    out = {}
    for i in latents:
        scores = dla_scores(lm, sae.latent(i), hook=sae.hook, basis=basis)
        top, bottom = top_tokens(scores.cpu(), k, tok)
        out[i] = tuple(
            [{"token": t.token, "token_id": t.token_id, "score": t.score} for t in side]
            for side in (top, bottom)
        )
    return out, ""


def latent_dashboards(
    lm: LoadedModel | nn.Module,
    sae: SAE,
    latents: list[int],
    texts: Corpus | list[str] | str | None = None,
    n_texts: int | None = None,
    max_tokens: int = 64,
    n_snippets: int = 8,
    n_tokens: int = 10,
    n_dla: int = 10,
    skip_first: int = 1,
    batch_size: int = 16,
    progress: bool = False,
) -> list[LatentDashboard]:
    """One LatentDashboard per latent in `latents` (see the module docstring)."""
    check_fits(sae, lm)
    for i in latents:
        sae.latent(i)  # out of range: SAEError, one line
    latents = [int(i) for i in latents]
    hf = unwrap(lm)
    tok = getattr(lm, "tokenizer", None)
    if tok is None:
        raise CorpusError("Dashboards need a tokenizer: pass a LoadedModel.")
    corpus = as_corpus(texts, n_texts)
    ids = tokenize_texts(tok, corpus.texts, max_tokens)
    dev = next(hf.parameters()).device
    enc = sae_on(sae, dev)
    cols = torch.tensor(latents, device=dev)
    n = len(latents)
    best = torch.full((len(ids), n), float("-inf"))  # [text, latent] max over positions
    best_pos = torch.zeros((len(ids), n), dtype=torch.long)
    values: list[torch.Tensor] = [torch.empty(0)] * len(ids)  # text -> [L, n], for shading
    n_active = torch.zeros(n, dtype=torch.float64)
    sum_active = torch.zeros(n, dtype=torch.float64)
    n_real = 0
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # batch rows -> texts
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    n_batches = -(-len(ids) // batch_size)
    with torch.no_grad(), progress_bar(n_batches, "dashboards", disable=not progress) as bar:
        for b, (x, m) in enumerate(padded_batches([ids[i] for i in order], batch_size, pad)):
            with record(hf, [sae.hook]) as r:
                hf(input_ids=x.to(dev), attention_mask=m.to(dev))
            z = enc.encode(r[sae.hook]).index_select(-1, cols).float().cpu()  # [B, L, n]
            rows = order[b * batch_size : b * batch_size + x.shape[0]]
            for row, t in enumerate(rows):
                values[t] = z[row, : len(ids[t])].clone()
            real = m.bool().clone()
            real[:, :skip_first] = False
            z = z.masked_fill(~real[..., None], float("-inf"))
            zr = z[real]  # [tokens, n]
            n_real += zr.shape[0]
            n_active += (zr > 0).sum(0).double()
            sum_active += zr.clamp_min(0).sum(0).double()
            best[rows], best_pos[rows] = z.max(dim=1)  # [B, n] each
            bar.update(1)
    dla, note = _dla(lm, sae, latents, n_dla)
    out = []
    for j, lat in enumerate(latents):
        top_texts = torch.argsort(best[:, j], descending=True)[:n_snippets].tolist()
        snippets = [
            _snippet(
                tok,
                ids[t],
                values[t][:, j],
                int(best_pos[t, j]),
                n_tokens,
                t,
            )
            for t in top_texts
            if best[t, j] > 0  # texts where the latent fires
        ]
        top, bottom = dla.get(lat, ([], []))
        out.append(
            LatentDashboard(
                latent=lat,
                snippets=snippets,
                dla_top=top,
                dla_bottom=bottom,
                frac_active=float(n_active[j] / max(n_real, 1)),
                mean_active=float(sum_active[j] / n_active[j]) if n_active[j] > 0 else 0.0,
                dla_note=note,
                meta={"n_texts": len(ids), "n_tokens": n_real, "corpus": corpus.source},
            )
        )
    return out


def _snippet(tok, ids: list[int], values: torch.Tensor, pos: int, n_tokens: int, text: int) -> dict:
    """The window of up to n_tokens around `pos` in one text (3/4 before, 1/4 after) with
    the latent's value at each token shown."""
    after = n_tokens // 4
    lo, hi = max(0, pos - (n_tokens - after - 1)), min(len(ids), pos + after + 1)
    return {
        "tokens": token_strings(tok, ids[lo:hi]),
        "pos": pos - lo,
        "value": float(values[pos]),
        "values": [float(v) for v in values[lo:hi]],
        "text": text,
    }
