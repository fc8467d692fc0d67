"""interpret.sae_dashboard: per-latent top snippets (against brute force), activity
statistics, and the decoder direction's DLA tokens (against interpret.dla)."""

from __future__ import annotations

import pytest
import torch
from _read_helpers import ByteTok

from steerdiff.hooks import record
from steerdiff.interpret.dla import dla_scores
from steerdiff.interpret.sae_dashboard import LatentDashboard, latent_dashboards
from steerdiff.sae import SAE, SAEError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [
    "hello there, world",
    "ab",
    "the quick brown fox jumps over",
    "owls at night hoot",
    "xyz",
    "a longer text of several words, for the window",
    "numbers 123 456 789",
]
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture
def lm(tiny_lm):
    tiny_lm.tokenizer = ByteTok()
    return tiny_lm


def _sae(d_sae: int = 24) -> SAE:
    g = torch.Generator().manual_seed(0)
    return SAE(
        W_enc=torch.randn(64, d_sae, generator=g),
        b_enc=0.2 * torch.randn(d_sae, generator=g),
        W_dec=torch.randn(d_sae, 64, generator=g),
        b_dec=torch.zeros(64),
        hook=HOOK,
    )


def _brute(lm, sae, latent, skip_first=1, max_tokens=32):
    """Every (text, position) value of the latent, each text run alone."""
    vals = []
    for t, text in enumerate(TEXTS):
        ids = ByteTok()(text)["input_ids"][:max_tokens]
        with torch.no_grad(), record(lm.model, [HOOK]) as r:
            lm.model(torch.tensor([ids]))
        z = sae.encode(r[HOOK][0])[:, latent]
        vals += [(float(z[p]), t, p, ids) for p in range(skip_first, len(ids))]
    return vals


def test_top_snippet_is_the_true_max_and_stats_match_brute_force(lm):
    """Bug caught: a batch's rows mapped back to the wrong texts (padded_batches sorts by
    length), pads or the first token counted as activity, the window not around the max.
    Mutations tried: `rows = list(range(b * batch_size, ...))` (unsorted mapping) -> the
    values land on other texts (an IndexError past a short text's end); skip_first ignored (`real[:, :0]`) -> frac_active
    differs from brute force."""
    sae = _sae()
    latents = [3, 11]
    dash = latent_dashboards(
        lm, sae, latents, TEXTS, max_tokens=32, n_snippets=3, n_tokens=8, batch_size=3
    )
    assert [d.latent for d in dash] == latents
    for d in dash:
        vals = _brute(lm, sae, d.latent)
        value, t, p, ids = max(vals)
        top = d.snippets[0]
        assert top["text"] == t and top["value"] == pytest.approx(value, abs=1e-5)
        assert top["tokens"][top["pos"]] == chr(ids[p])
        assert top["values"][top["pos"]] == pytest.approx(value, abs=1e-5)
        assert len(top["tokens"]) == len(top["values"]) <= 8
        # one snippet per text, by each text's max, descending
        per_text = {}
        for v, tt, _, _ in vals:
            per_text[tt] = max(per_text.get(tt, -1e9), v)
        want = [v for v in sorted(per_text.values(), reverse=True) if v > 0][:3]
        assert [s["value"] for s in d.snippets] == pytest.approx(want, abs=1e-5)
        active = [v for v, *_ in vals if v > 0]
        assert d.frac_active == pytest.approx(len(active) / len(vals), abs=1e-9)
        assert d.mean_active == pytest.approx(sum(active) / max(len(active), 1), rel=1e-5)
        assert LatentDashboard.from_dict(d.to_dict()) == d


def test_dla_tokens_are_dla_scores_top_ids_and_bad_latent_is_one_line(lm):
    """Bug caught: the DLA read from the encoder column (or another latent's row) instead of
    the decoder direction, or uncentred; snippets of texts where the latent is 0. Mutations
    tried: `sae.W_enc[:, i]` in place of sae.latent(i) -> the token ids differ; the
    snippet filter `best > -inf` -> the dead latent gets 3 zero-valued snippets.
    A latent out of range is sae.latent's one line."""
    sae = _sae()
    (d,) = latent_dashboards(lm, sae, [5], TEXTS, n_snippets=1, n_dla=6)
    scores = dla_scores(lm, sae.W_dec[5], hook=HOOK)
    assert [t["token_id"] for t in d.dla_top] == scores.topk(6).indices.tolist()
    assert [t["token_id"] for t in d.dla_bottom] == (-scores).topk(6).indices.tolist()
    assert d.dla_top[0]["token"] == chr(d.dla_top[0]["token_id"])
    assert d.dla_top[0]["score"] == pytest.approx(float(scores.max()), rel=1e-5)
    # a latent that never fires has no snippets (not zero-valued ones) and no activity
    sae.b_enc[0] = -1e6
    (dead,) = latent_dashboards(lm, sae, [0], TEXTS, n_snippets=3)
    assert dead.snippets == [] and dead.frac_active == 0.0 and dead.mean_active == 0.0
    with pytest.raises(
        SAEError, match="Latent 24 is out of range .* 24 latents, use an index in 0-23"
    ):
        latent_dashboards(lm, sae, [1, 24], TEXTS)
