"""Shared-prefix sampling (generate.prefix): the prompts' common prefix runs once into a KV
cache that every batch reuses, and the tokens stay those of per-row sampling and of
model.generate (greedy), under steering, constraints and top-k log-probs alike."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny
from test_generate import _hf_greedy

from steerdiff.generate import SampleStats, sample
from steerdiff.generate.prefix import common_prefix_len, suffix_batch
from steerdiff.hooks import HookError, steer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEAD = [7, 8, 9, 10, 11, 12]  # what every prompt starts with (a chat template, say)
PROMPTS = [HEAD + s for s in ([13, 14], [20, 21, 22, 23, 24], [30], [13, 14, 15, 16])]


def _greedy(m, prompts, n=10, **kw):
    st = SampleStats()
    res = sample(m, prompts, n, temperature=0, stop_ids=kw.pop("stop_ids", [5]), stats=st, **kw)
    return [s.token_ids for s in res], st


def test_greedy_with_a_shared_prefix_is_per_row_sampling_and_generate(tiny):
    """Bugs caught: suffix position ids that restart at 0 (or count the pads), pads between
    prefix and suffix that are attended to, a prefix cache not expanded to every row, and a
    family whose cache class breaks when the prefix comes from another forward (gemma3's
    sliding layers; its tiny window of 4 is shorter than the sequences, so it must fall
    back to whole prompts: no shared tokens)."""
    shared, st = _greedy(tiny, PROMPTS, pad_id=0)
    unshared, st0 = _greedy(tiny, PROMPTS, pad_id=0, share_prefix=False)
    assert shared == unshared == _hf_greedy(tiny, PROMPTS, 10, eos=5)
    window = tiny.config.model_type == "gemma3_text"  # sliding_window=4 in the tiny config
    assert st.shared_tokens == (0 if window else len(HEAD) * len(PROMPTS))
    assert st0.shared_tokens == 0 and st.prompt_tokens == st0.prompt_tokens == 36


def test_sliding_window_model_shares_when_the_window_covers_the_sequence(monkeypatch):
    """gemma3 (every tiny layer a DynamicSlidingWindowLayer): with a window longer than
    prompt + new tokens the prefix is shared and the tokens are generate's; with the tiny
    window of 4 sharing would change them (pads take window places), so it is off.
    Bug caught: sharing regardless of the window (the second half fails)."""
    monkeypatch.setitem(
        TINY_CONFIGS, "gemma3_wide", dict(TINY_CONFIGS["gemma3_text"], sliding_window=32)
    )
    wide = make_tiny("gemma3_wide")
    shared, st = _greedy(wide, PROMPTS, pad_id=0)
    assert shared == _hf_greedy(wide, PROMPTS, 10, eos=5)
    assert st.shared_tokens == len(HEAD) * len(PROMPTS)
    narrow = make_tiny("gemma3_text")
    shared, st = _greedy(narrow, PROMPTS, pad_id=0)
    assert shared == _hf_greedy(narrow, PROMPTS, 10, eos=5) and st.shared_tokens == 0


@pytest.mark.parametrize("positions", ["all", "response", "prompt", "first:3", "first:8"])
def test_steered_greedy_with_a_shared_prefix_matches_generate(positions):
    """hooks.steer's positions are computed from the sequence the hook sees; with a shared
    prefix the prompt arrives in two forwards. Bug caught: the suffix prefill counted as
    response (positions "prompt" / "response" then steer the wrong tokens; removing the
    PROMPT_CONTINUES check in hooks fails both), first:k counted from the suffix start."""
    m = make_tiny("qwen2")
    v = {
        "blocks.1.hook_resid_post": 4.0
        * torch.randn(64, generator=torch.Generator().manual_seed(1))
    }
    plain, _ = _greedy(m, PROMPTS, 8, stop_ids=[], pad_id=0)
    with steer(m, v, positions=positions):
        shared, st = _greedy(m, PROMPTS, 8, stop_ids=[], pad_id=0)
        unshared, _ = _greedy(m, PROMPTS, 8, stop_ids=[], pad_id=0, share_prefix=False)
        hf = _hf_greedy(m, PROMPTS, 8, eos=-1)
    assert shared == unshared == hf
    assert shared != plain and st.shared_tokens == len(HEAD) * len(PROMPTS)


def test_seeded_sampling_with_a_shared_prefix_draws_the_same_tokens():
    """Same seed, same tokens: the rows draw from the same generator stream in the same
    order, and the probabilities differ only by float rounding (~1e-7), so a token could
    differ only if a uniform fell within ~1e-7 of a CDF boundary; identical tokens are
    therefore the exact check (no statistical tolerance needed). Bug caught: a prefix cache
    from other tokens (e.g. the first prompt's whole prompt) or another row's suffix."""
    m = make_tiny("llama")
    prompts = PROMPTS * 3
    kw = dict(temperature=1.0, top_p=0.9, seed=11, stop_ids=[5], pad_id=0, batch_size=5)
    st = SampleStats()
    a = sample(m, prompts, 12, stats=st, **kw)
    b = sample(m, prompts, 12, share_prefix=False, **kw)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert st.shared_tokens == len(HEAD) * len(prompts)
    assert len({tuple(s.token_ids) for s in a}) > 4  # sampled, not all equal


def test_the_prefix_runs_once_and_serves_every_batch():
    """Bugs caught: the prefix recomputed for every batch (more than one [1, 6] forward), and
    a batch that appends to the shared cache instead of its own copy (the later batches then
    see the first batch's tokens: their outputs differ from per-row sampling)."""
    m = make_tiny("llama")
    prompts = PROMPTS * 3  # 12 prompts, batches of 5: three batches share one prefix pass
    prefix_passes = []
    handle = m.register_forward_pre_hook(
        lambda _m, _a, kw: (
            prefix_passes.append(kw["input_ids"].shape)
            if kw["past_key_values"].get_seq_length() == 0
            else None
        ),
        with_kwargs=True,
    )
    try:
        shared, st = _greedy(m, prompts, 9, pad_id=0, batch_size=5)
    finally:
        handle.remove()
    assert prefix_passes == [torch.Size([1, len(HEAD)])]
    unshared, _ = _greedy(m, prompts, 9, pad_id=0, batch_size=5, share_prefix=False)
    assert shared == unshared == _greedy(m, prompts, 9, pad_id=0, batch_size=12)[0]


@pytest.mark.parametrize(
    "prompts, shared_tokens",
    [
        ([[40, 41, 42], [50, 51], [60, 61, 62, 63]], 0),  # no common prefix
        ([HEAD + [13, 14]], 7),  # one prompt: all but its last token
        ([HEAD + [13, 14]] * 3, 21),  # identical prompts
        ([HEAD, HEAD + [13, 14], HEAD + [30]], 15),  # a prompt equal to the common prefix
    ],
    ids=["no-common-prefix", "one-prompt", "identical", "prompt-is-the-prefix"],
)
def test_edge_cases_of_the_common_prefix(prompts, shared_tokens):
    """Bug caught: a prefix that takes a whole prompt (its suffix is empty: no token left to
    give its first logits; the cap at the shortest prompt minus one is what prevents it),
    and sharing when nothing is shared."""
    m = make_tiny("qwen3")
    shared, st = _greedy(m, prompts, 8, pad_id=0)
    assert shared == _greedy(m, prompts, 8, pad_id=0, share_prefix=False)[0]
    assert shared == _hf_greedy(m, prompts, 8, eos=5)
    assert st.shared_tokens == shared_tokens


def test_common_prefix_len_and_suffix_layout():
    """The layout the docstring of generate.prefix draws. Bugs caught: pads placed after the
    suffix, positions that skip the cached prefix, a prefix covering a whole prompt."""
    assert common_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_len([[1, 2], [1, 2, 3]]) == 1
    assert common_prefix_len([[1, 2, 3], [4, 2, 3]]) == 0
    ids, attn, pos = suffix_batch([[1, 2, 3, 4], [1, 2, 5]], 2, 0, 2, "cpu")
    assert ids.tolist() == [[3, 4], [0, 5]]
    assert attn.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 0, 0]]
    assert pos.tolist() == [[2, 3], [0, 2]]


def test_constrained_topk_and_grammar_are_unchanged_by_sharing():
    """Bugs caught: the prefix pass run under the restricted unembedding or the grammar
    (it must only fill the cache), and top-k log-probs of a shifted position."""

    class EveryOther:  # a grammar: digits 7/8 and separator 9 alternate
        def mask(self, tokens, cand):
            want_sep = bool(tokens) and tokens[-1] != 9
            return [(c == 9) == want_sep or c == 3 for c in cand]

    m = make_tiny("gemma2")
    kw = dict(temperature=0.7, seed=2, stop_ids=[3], allowed_ids=[7, 8, 9], pad_id=0)
    for extra in ({"topk": 0}, {"topk": 4}, {"topk": 0, "grammar": EveryOther()}):
        st = SampleStats()
        a = sample(m, PROMPTS, 8, stats=st, **kw, **extra)
        b = sample(m, PROMPTS, 8, share_prefix=False, **kw, **extra)
        assert st.shared_tokens == len(HEAD) * len(PROMPTS)
        for x, y in zip(a, b, strict=True):
            assert x.token_ids == y.token_ids and set(x.token_ids) <= {3, 7, 8, 9}
            assert x.topk_ids == y.topk_ids and len(x.topk_ids) == len(x.token_ids) * (
                extra["topk"] > 0
            )
            assert torch.allclose(
                torch.tensor(x.topk_logprobs), torch.tensor(y.topk_logprobs), atol=1e-4
            )


def test_a_per_row_coeff_is_refused_with_a_shared_prefix():
    """A per-row coeff cannot steer one pass shared by all rows; docs/generate.md promises an
    error naming the shapes (fix: share_prefix=False), not a silently mixed result. Bug
    caught: a prefix pass steered with one row's coefficient for all rows."""
    m = make_tiny("llama")
    v = {"blocks.1.hook_resid_post": torch.randn(64)}
    with steer(m, v, coeff=torch.tensor([1.0, 2.0, 3.0, 4.0])):
        with pytest.raises(HookError, match="Per-row coeff has shape \\(4,\\) but this forward"):
            sample(m, PROMPTS, 2, temperature=0, stop_ids=[], pad_id=0)


def test_the_unembedding_gets_a_contiguous_input_and_the_hook_is_removed():
    """HF unembeds hidden[:, -1:, :] (a strided view) in the prefill; torch's CPU linear then
    copies the weight once per row ([batch, d, vocab]: 10 s instead of 0.06 s for a batch of
    32 on the embedded model in bfloat16). Bugs caught: the head fed that view (no speed
    test here: the input's layout is what decides the kernel), a hook left on the model."""
    m = make_tiny("llama")
    head = m.get_output_embeddings()
    seen = []
    handle = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    try:
        sample(m, PROMPTS, 3, temperature=0, stop_ids=[], pad_id=0)
    finally:
        handle.remove()
    assert [tuple(x.shape) for x in seen] == [(1, 1, 64), (4, 1, 64), (4, 1, 64), (4, 1, 64)]
    assert all(x.is_contiguous() for x in seen)
    assert not head._forward_pre_hooks and not head._forward_hooks


# ----------------------------------------------------------------------------- teacher scoring

TEACHERS = {
    "plain": {"kind": "plain"},
    "steered-all": {"kind": "steered", "coeff": 2.0, "positions": "all"},
    "steered-first:8": {"kind": "steered", "coeff": 2.0, "positions": "first:8"},
    "steered-response": {"kind": "steered", "coeff": 2.0, "positions": "response"},
}


@pytest.mark.parametrize("name", list(TEACHERS))
def test_teacher_losses_and_topk_with_a_shared_prefix_equal_full_passes(tiny, name):
    """fit.teacher runs the rows' shared prefix once ([1, P]) then each row's rest. Bugs
    caught: rest positions that restart at 0, a prefix cache not repeated per row, the
    prefix's states put at the wrong positions (top-k of a completion's first token),
    sliding-window layers (gemma3's window of 4) broken by a cache that holds the prefix,
    and a response- or first:k-steered teacher shared (it must not be: its mask covers
    whole rows; first:k counts positions in the model's forward, which is skipped)."""
    from steerdiff.fit import Example, annotate_topk
    from steerdiff.fit.data import collate
    from steerdiff.fit.losses import model_losses
    from steerdiff.fit.teacher import as_teacher, teacher_losses

    dim = tiny.config.hidden_size
    spec = dict(TEACHERS[name])
    if spec["kind"] == "steered":
        spec["vectors"] = {"blocks.1.hook_resid_post": torch.randn(dim)}
    teacher = as_teacher(spec, tiny)
    exs = [
        Example(HEAD + [13, 14], [40, 41, 42]),
        Example(HEAD + [20, 21, 22, 23], [50]),
        Example(HEAD + [30], [60, 61]),
    ]
    batch = collate(exs, 0, teacher=True)
    passes = []
    base = tiny.base_model
    handle = base.register_forward_pre_hook(
        lambda _m, _a, kw: passes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        ce, _ = teacher_losses(teacher, batch)
        ours = annotate_topk(
            tiny, [Example(e.prompt_ids, e.completion_ids) for e in exs], teacher, k=5
        )
    finally:
        handle.remove()
    with torch.no_grad(), teacher.scoring(batch.response_mask, batch.attention_mask) as model:
        want, _ = model_losses(model, batch, "sft")  # one full pass over the padded rows
        logp = torch.log_softmax(
            model(batch.input_ids, attention_mask=batch.attention_mask).logits.float(), -1
        )
    assert torch.allclose(ce, want, atol=1e-4, rtol=1e-5)
    top = logp[batch.loss_mask].topk(5, dim=-1)
    assert [t for e in ours for t in e.topk_ids] == top.indices.tolist()
    got = torch.tensor([t for e in ours for t in e.topk_logprobs])
    assert torch.allclose(got, top.values, atol=1e-4)
    shared = name in ("plain", "steered-all")
    assert passes == ([(1, 6), (3, 5)] * 2 if shared else [(3, 11)] * 2)
