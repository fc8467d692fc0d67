"""The prefix engine: a replay from block L equals the full HF forward, for each use
(the fit's prefix, the sweep's recorded passes with a KV cache, the lens's recording),
on the tiny model of every supported family."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from steerdiff.hooks import final_norm, get_blocks, get_hook_point, record, select_hooks, steer
from steerdiff.replay import (
    ReplayCache,
    compute_prefix,
    lm_head,
    prefix_hidden,
    record_forward,
    recording,
    replay_blocks,
)

IDS = torch.tensor([[5, 6, 7, 8, 9, 3, 9, 10], [5, 6, 12, 13, 14, 15, 16, 17]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]])  # right padding


def _vectors(model: torch.nn.Module, patterns: list[str]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    names = select_hooks(model, patterns)
    return {n: torch.randn(get_hook_point(model, n).dim, generator=g) for n in names}


def test_fit_prefix_replays_the_full_forward(tiny):
    """compute_prefix + prefix_hidden + lm_head == the HF logits, also under steering."""
    real = MASK.bool()
    vecs = _vectors(tiny, ["blocks.1.attn.hook_{q,k,v}", "blocks.2.ln2.hook_normalized"])
    for vectors, starts in (({}, [0, 1, 2]), (vecs, [0, 1])):
        with torch.no_grad(), steer(tiny, vectors):
            full = tiny(input_ids=IDS, attention_mask=MASK).logits
            for start in starts:
                prefix = compute_prefix(tiny, IDS, MASK, start)
                assert len(prefix.calls) == 3 - start and not prefix.outputs
                logits = lm_head(tiny, prefix_hidden(tiny, prefix))
                torch.testing.assert_close(logits[real], full[real], atol=1e-5, rtol=1e-5)
    assert all(type(b).__name__ != "_Recorder" for b in get_blocks(tiny))  # restored


def test_fit_prefix_replay_has_gradients(tiny):
    """Bug caught: a replay that detaches (no or zero gradient) or drops a block's term.
    The vector's gradient through the replayed blocks equals the full forward's."""
    v = torch.zeros(tiny.config.hidden_size, requires_grad=True)
    prefix = compute_prefix(tiny, IDS, MASK, 1)
    real = MASK.bool()
    with steer(tiny, {"blocks.1.hook_resid_pre": v}):
        lm_head(tiny, prefix_hidden(tiny, prefix))[real].sum().backward()
    replayed, v.grad = v.grad, None
    with steer(tiny, {"blocks.1.hook_resid_pre": v}):
        tiny(input_ids=IDS, attention_mask=MASK).logits[real].sum().backward()
    assert replayed is not None and float(replayed.norm()) > 1e-3
    torch.testing.assert_close(replayed, v.grad, rtol=1e-4, atol=1e-5)


def test_sweep_recorded_passes_replay_from_every_layer(tiny):
    """Two cached passes (left-padded prompts, then continuation tokens) recorded once,
    unsteered; a vector at blocks.{L}.hook_resid_post replayed from block L+1 with a
    replay KV cache gives the logits of the full steered passes."""
    prompt = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 8, 9, 10]])
    pmask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ppos = (pmask.cumsum(-1) - 1).clamp_min(0)
    cont = torch.tensor([[11, 12, 13], [14, 15, 16]])
    cmask = torch.cat([pmask, torch.ones_like(cont)], dim=1)
    cpos = ppos[:, -1:] + 1 + torch.arange(3)
    passes = [
        dict(input_ids=prompt, attention_mask=pmask, position_ids=ppos),
        dict(input_ids=cont, attention_mask=cmask, position_ids=cpos),
    ]

    real = [pmask.bool(), torch.ones_like(cont, dtype=torch.bool)]
    with torch.inference_mode():
        cache = DynamicCache()  # keeps every position (see ReplayCache)
        recs = [
            record_forward(tiny, keep_outputs=True, **p, past_key_values=cache, use_cache=True)
            for p in passes
        ]
        v = torch.randn(tiny.config.hidden_size, generator=torch.Generator().manual_seed(1))
        for layer in range(3):
            cache = DynamicCache(config=tiny.config)
            with steer(tiny, {f"blocks.{layer}.hook_resid_post": v}):
                full = [tiny(**p, past_key_values=cache, use_cache=True).logits for p in passes]
            kv = ReplayCache()
            for rec, want, m in zip(recs, full, real, strict=True):
                h = replay_blocks(tiny, rec, rec.output(layer) + v, first=layer + 1, cache=kv)
                got = lm_head(tiny, final_norm(tiny)(h))
                torch.testing.assert_close(got[m], want[m], atol=1e-4, rtol=1e-4)


def test_lens_recording_replays_under_steering(tiny):
    """A real forward recorded from `start` (blocks run, hooks before it read as usual),
    replayed with vectors added at the real tokens, equals the full steered forward."""
    real = MASK.bool()
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    for start in range(3):
        vecs = _vectors(tiny, [f"blocks.{start}.hook_resid_pre", "blocks.2.attn.hook_v"])
        with torch.no_grad():
            with steer(tiny, vecs, positions=real):
                want = tiny(input_ids=IDS, attention_mask=MASK).logits
            with record(tiny, hooks) as r0, recording(tiny, start) as prefix:
                h0 = tiny.base_model(input_ids=IDS, attention_mask=MASK).last_hidden_state
            assert len(prefix.calls) == 3 - start and r0[hooks[1]].shape[1] == IDS.shape[1]
            torch.testing.assert_close(prefix_hidden(tiny, prefix), h0, atol=1e-5, rtol=1e-5)
            with steer(tiny, vecs, positions=real):
                got = lm_head(tiny, prefix_hidden(tiny, prefix))
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_recording_keeps_hooks_entered_before_it(tiny):
    """steer/record entered before recording(...) act on the running blocks; the blocks
    are restored afterwards, also when the pass fails."""
    blocks = list(get_blocks(tiny))
    v = {"blocks.1.hook_resid_post": torch.ones(tiny.config.hidden_size)}
    with torch.no_grad():
        with steer(tiny, v):
            want = tiny(input_ids=IDS).logits
        with steer(tiny, v), recording(tiny, 1, keep_outputs=True) as prefix:
            got = tiny(input_ids=IDS).logits
        torch.testing.assert_close(got, want)
        assert len(prefix.outputs) == 2
        with pytest.raises(RuntimeError), recording(tiny, 0):
            raise RuntimeError("boom")
    assert list(get_blocks(tiny)) == blocks


def test_sweep_cached_prompts_match_the_full_cached_passes(tiny):
    """evals.CachedPrompts (a shared prompt prefix, left-padded remainders, continuation
    rows of several lengths; sliding windows shorter than the prompts) replayed from
    every layer equals prefix_forward / continue_forward under the same steering."""
    from _read_helpers import ByteTok

    from steerdiff.evals import CachedPrompts, Steering, continue_forward, prefix_forward
    from steerdiff.models import wrap_model

    lm = wrap_model(tiny, ByteTok(), spec="tiny")
    prompts = [[1, 5, 6, 7, 8, 9], [1, 5, 6, 10, 11], [1, 5, 6, 12, 13, 14, 15, 16]]
    row_prompt, row_tokens = [0, 1, 2, 0], [[20, 21], [22], [23, 24, 25], [26]]
    cached = CachedPrompts(lm, prompts, row_prompt, row_tokens)
    v = torch.randn(tiny.config.hidden_size, generator=torch.Generator().manual_seed(2))
    for layer in range(3):
        for coeff in (0.0, 3.0):
            steering = Steering({f"blocks.{layer}.hook_resid_post": v}, coeff=coeff)
            full = prefix_forward(lm, prompts, steering)
            rows = continue_forward(
                lm, full, row_prompt, row_tokens, lambda logits, _rows: logits, steering
            )  # [R, 3, vocab], right-padded
            last, cont = cached.replay(layer, v, coeff)
            torch.testing.assert_close(cached.head(last), full.last_logits, atol=1e-4, rtol=0)
            got = cached.head(cont)
            for i, toks in enumerate(row_tokens):
                at = cached.flat[i, : len(toks)]
                torch.testing.assert_close(got[at], rows[i, : len(toks)], atol=1e-4, rtol=0)
