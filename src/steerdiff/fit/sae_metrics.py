"""How good an SAE is, on held-out texts: reconstruction and the loss when it is spliced in.

`evaluate_saes(lm, saes, texts)` runs each text (truncated to max_len tokens, up to
max_tokens in all) once clean, then, per SAE, once with the SAE's reconstruction spliced
into its hook and once with that hook zero-ablated (`sae.splice.replace_activations`), and
reports per SAE:

    explained_variance  1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2   (= 1 - fvu)
    mse                 mean over tokens of |x - x_hat|^2 / d_in
    l0                  mean number of nonzero latents per token
    dead_fraction       latents that never fired on these evaluation tokens
    ce_clean / ce_spliced / ce_zero_ablated   mean next-token cross-entropy (nats)
    ce_recovered        (ce_zero_ablated - ce_spliced) / (ce_zero_ablated - ce_clean)

Activations, splicing and ablation leave out each text's first token (the attention sink an
SAE is not trained on) and padding; the cross-entropy is over every real next token.
"""

from __future__ import annotations

import torch

from ..chat import encode
from ..hooks import record
from ..interpret.batching import padded_batches
from ..models import LoadedModel
from ..sae import SAE, SAEError, check_fits
from ..sae.splice import reconstruction, replace_activations


def _batches(
    lm: LoadedModel, texts: list[str], max_len: int, max_tokens: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) [batch, pos], right-padded, max_tokens tokens at most."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    rows, total = [], 0
    for text in texts:
        ids = encode(tok, text)[:max_len]
        if len(ids) < 2:
            continue
        rows.append(ids)
        total += len(ids)
        if total >= max_tokens:
            break
    return [(x.to(lm.device), m.to(lm.device)) for x, m in padded_batches(rows, batch_size, pad)]


@torch.no_grad()
def _ce_sum(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token CE over real targets, their count)."""
    logits = lm.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target, real = ids[:, 1:], mask[:, 1:].bool()
    ce = torch.nn.functional.cross_entropy(logits[real], target[real], reduction="sum")
    return float(ce), int(real.sum())


def _zero(skip_first: int):
    def fn(h: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(h)
        out[:, :skip_first] = h[:, :skip_first]
        return out

    return fn


class _Stats:
    """Running sums for one SAE's reconstruction figures (float64)."""

    def __init__(self, sae: SAE) -> None:
        self.n = 0
        self.sse = 0.0
        self.sum_x = torch.zeros(sae.d_in, dtype=torch.float64)
        self.sum_sq = 0.0
        self.l0 = 0.0
        self.fired = torch.zeros(sae.d_sae, dtype=torch.bool)
        self.ce = {"spliced": 0.0, "zero": 0.0}

    def add(self, sae: SAE, x: torch.Tensor) -> None:  # x: [n, d_in]
        x = x.float().cpu()
        z = sae.encode(x)
        x_hat = sae.decode(z)
        self.n += x.shape[0]
        self.sse += float(((x - x_hat).double() ** 2).sum())
        self.sum_x += x.double().sum(0)
        self.sum_sq += float((x.double() ** 2).sum())
        active = z > 0
        self.l0 += float(active.sum())
        self.fired |= active.any(0)


def evaluate_saes(
    lm: LoadedModel,
    saes: list[SAE],
    texts: list[str],
    max_len: int = 256,
    max_tokens: int = 16384,
    batch_size: int = 4,
    skip_first: int = 1,
) -> dict[str, dict]:
    """{hook: metrics} for SAEs at distinct hooks of `lm` (see the module docstring)."""
    for sae in saes:
        check_fits(sae, lm)
    hooks = [s.hook for s in saes]
    batches = _batches(lm, texts, max_len, max_tokens, batch_size)
    if not batches:
        raise SAEError(
            f"No evaluation text ({len(texts)} given) has 2 or more tokens: give longer texts."
        )
    stats = {s.hook: _Stats(s) for s in saes}
    ce_clean, n_ce = 0.0, 0
    for ids, mask in batches:
        with record(lm.model, hooks) as rec:
            ce, n = _ce_sum(lm, ids, mask)
        ce_clean, n_ce = ce_clean + ce, n_ce + n
        keep = mask.bool().clone()
        keep[:, :skip_first] = False
        for sae in saes:
            stats[sae.hook].add(sae, rec[sae.hook][keep])
            with replace_activations(lm, {sae.hook: reconstruction(sae, skip_first)}):
                stats[sae.hook].ce["spliced"] += _ce_sum(lm, ids, mask)[0]
            with replace_activations(lm, {sae.hook: _zero(skip_first)}):
                stats[sae.hook].ce["zero"] += _ce_sum(lm, ids, mask)[0]
    n_texts = sum(ids.shape[0] for ids, _ in batches)
    return {s.hook: _metrics(stats[s.hook], s, ce_clean, n_ce, n_texts) for s in saes}


def _metrics(st: _Stats, sae: SAE, ce_clean: float, n_ce: int, n_texts: int) -> dict:
    n = max(st.n, 1)
    total_var = st.sum_sq - float((st.sum_x**2).sum()) / n
    fvu = st.sse / total_var if total_var > 0 else float("nan")
    clean, spliced, zero = ce_clean / n_ce, st.ce["spliced"] / n_ce, st.ce["zero"] / n_ce
    return {
        "hook": sae.hook,
        "explained_variance": 1 - fvu,
        "fvu": fvu,
        "mse": st.sse / n / sae.d_in,
        "l0": st.l0 / n,
        "dead_fraction": 1 - float(st.fired.float().mean()),
        "dead_definition": f"latents that never fired on the {st.n} evaluation tokens",
        "ce_clean": clean,
        "ce_spliced": spliced,
        "ce_zero_ablated": zero,
        "ce_recovered": (zero - spliced) / (zero - clean) if zero != clean else float("nan"),
        "n_tokens": st.n,
        "n_ce_tokens": n_ce,
        "n_texts": n_texts,
    }


def evaluate_sae(lm: LoadedModel, sae: SAE, texts: list[str], **kwargs) -> dict:
    """The metrics of one SAE (evaluate_saes' keyword arguments: max_len, max_tokens, ...)."""
    return evaluate_saes(lm, [sae], texts, **kwargs)[sae.hook]
