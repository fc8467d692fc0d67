"""The batched sampler (greedy = model.generate, steering, constraints, top-k) and the
resumable dataset writer."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from steerdiff.generate import (
    SampleStats,
    sample,
)
from steerdiff.hooks import steer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread for this module (much faster on a shared, oversubscribed CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PROMPTS = [
    [11, 12, 13, 14, 15],
    [21, 22, 23, 24, 25, 26, 27, 28, 29],
    [31, 32, 33],
    [41, 42, 43, 44],
]


def _hf_greedy(model, prompts, n, eos, pad=0):
    """model.generate on the same left-padded batch, cut after the first eos."""
    plen = max(map(len, prompts))
    ids = torch.full((len(prompts), plen), pad)
    am = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, plen - len(p) :] = torch.tensor(p)
        am[r, plen - len(p) :] = 1
    g = model.generate(
        input_ids=ids,
        attention_mask=am,
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=eos,
        pad_token_id=pad,
    )[:, plen:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in g]


def test_greedy_matches_generate_every_family(tiny):
    res = sample(tiny, PROMPTS, max_new_tokens=10, temperature=0, stop_ids=[5], pad_id=0)
    assert [s.token_ids for s in res] == _hf_greedy(tiny, PROMPTS, 10, eos=5)
    assert [s.index for s in res] == [0, 1, 2, 3]


def test_greedy_matches_generate_with_early_stops_and_small_batches():
    m = make_tiny("llama")
    ref = sample(m, PROMPTS, max_new_tokens=12, temperature=0, stop_ids=[], pad_id=0)
    eos = ref[2].token_ids[2]  # a token row 2 emits at step 3: rows stop at different steps
    hf = _hf_greedy(m, PROMPTS, 12, eos=eos)
    for bs, compact in ((4, True), (4, False), (3, True), (1, True)):
        res = sample(
            m, PROMPTS, 12, temperature=0, stop_ids=[eos], batch_size=bs, pad_id=0, compact=compact
        )
        assert [s.token_ids for s in res] == hf, (bs, compact)
    assert res[2].stopped and res[2].token_ids[-1] == eos


@pytest.mark.parametrize("positions", ["all", "response", "prompt", "first:3"])
def test_steered_greedy_matches_generate_under_the_same_steer(positions):
    m = make_tiny("qwen2")
    v = {
        "blocks.1.hook_resid_post": 4.0
        * torch.randn(64, generator=torch.Generator().manual_seed(1))
    }
    plain = sample(m, PROMPTS, 8, temperature=0, stop_ids=[], pad_id=0)
    with steer(m, v, positions=positions):
        ours = sample(m, PROMPTS, 8, temperature=0, stop_ids=[], pad_id=0)
        hf = _hf_greedy(m, PROMPTS, 8, eos=-1)
    assert [s.token_ids for s in ours] == hf
    assert [s.token_ids for s in ours] != [s.token_ids for s in plain]


def test_sampling_is_seeded_and_top_p_small_is_greedy():
    m = make_tiny("llama")
    a = sample(m, PROMPTS, 8, temperature=1.0, seed=3, stop_ids=[])
    b = sample(m, PROMPTS, 8, temperature=1.0, seed=3, stop_ids=[])
    c = sample(m, PROMPTS, 8, temperature=1.0, seed=4, stop_ids=[])
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]
    greedy = sample(m, PROMPTS, 8, temperature=0, stop_ids=[])
    nucleus = sample(m, PROMPTS, 8, temperature=1.0, top_p=1e-6, seed=5, stop_ids=[])
    assert [s.token_ids for s in nucleus] == [s.token_ids for s in greedy]


def test_constrained_sampling_follows_the_renormalised_distribution():
    """Bugs caught: constrained sampling that does not draw from the model's distribution
    renormalised over the allowed tokens (e.g. uniformly, from the full softmax, or
    ignoring the temperature), in either path: the restricted unembedding (topk 0) and
    the masked full logits (topk > 0); token counts miscounted in the stats."""
    m = make_tiny("gemma2")
    prompt, allowed, n = PROMPTS[1], [7, 8, 9, 100], 4000
    options = [3, 7, 8, 9, 100]  # the allowed tokens and the stop token
    with torch.no_grad():
        logits = m(torch.tensor([prompt])).logits[0, -1]  # [V]
    want = (logits[options] / 0.25).softmax(-1)  # [5]: 0.24 0.12 0.12 0.13 0.39
    for topk in (0, 4):
        st = SampleStats()
        res = sample(
            m,
            [prompt] * n,
            1,
            temperature=0.25,
            seed=topk,
            stop_ids=[3],
            allowed_ids=allowed,
            topk=topk,
            stats=st,
            batch_size=n,
        )
        first = torch.tensor([s.token_ids[0] for s in res])
        freq = torch.stack([(first == t).float().mean() for t in options])
        assert freq.sum().item() == pytest.approx(1.0)  # nothing outside the allowed set
        assert torch.allclose(freq, want, atol=0.035), (topk, freq, want)  # sd <= 0.008
        assert st.new_tokens == n and st.prompt_tokens == n * len(prompt)


def test_topk_under_constraint_is_the_unconstrained_distribution():
    """What docs/generate.md promises for `--constrained --topk K` (the setup distillation
    needs): the stored top-k are the model's full-vocabulary log-probs at temperature 1,
    before the constraint and the temperature. Bugs caught: top-k taken after the
    constraint (ids from the allowed set only) or after the temperature."""
    m = make_tiny("llama")
    allowed = [7, 8, 9, 100]
    res = sample(
        m, PROMPTS, 6, temperature=0.5, seed=0, stop_ids=[], allowed_ids=allowed, topk=5
    )
    for p, s in zip(PROMPTS, res, strict=True):
        assert set(s.token_ids) <= set(allowed) and len(s.token_ids) == 6
        with torch.no_grad():
            logits = m(torch.tensor([p + s.token_ids])).logits[0].float()  # [len, V]
        lp = logits.log_softmax(-1)[len(p) - 1 : len(p) + 5]  # the 6 generating positions
        v, i = lp.topk(5, dim=-1)  # [6, 5]
        assert s.topk_ids == i.tolist()
        assert torch.allclose(torch.tensor(s.topk_logprobs), v, atol=1e-4)
    # greedy unconstrained: the chosen token is the top-1 of the stored distribution
    g = sample(m, PROMPTS, 6, temperature=0, stop_ids=[], topk=2)
    assert all(s.token_ids == [r[0] for r in s.topk_ids] for s in g)


def test_greedy_matches_generate_on_embedded_model(smollm):
    tok = smollm.tokenizer
    users = ["Name a bird.", "Count to three: 1, 2,", "Say hello in French, briefly please."]
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": u}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for u in users
    ]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ours = sample(smollm, prompts, 12, temperature=0, batch_size=3)
    assert [s.token_ids for s in ours] == _hf_greedy(
        smollm.model, prompts, 12, eos, tok.pad_token_id
    )


def test_cli_errors_before_loading_anything(tmp_path):
    from typer.testing import CliRunner

    from steerdiff.cli import app

    blocker = tmp_path / "file"
    blocker.write_text("")
    r = CliRunner().invoke(
        app, ["generate", "--out", str(blocker / "d.jsonl"), "--teacher", "plain"]
    )
    assert r.exit_code == 2 and "Cannot write" in r.output
    r = CliRunner().invoke(
        app, ["generate", "--out", str(tmp_path / "d.jsonl"), "--teacher", "steered"]
    )
    assert r.exit_code == 2 and "needs --vectors" in r.output
    r = CliRunner().invoke(
        app, ["generate", "--out", str(tmp_path / "d.jsonl"), "--backend", "vllm"]
    )
    assert r.exit_code == 2 and "vLLM" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_grammar_keeps_every_row_a_valid_list():
    from steerdiff.tasks.numbers import NumberListGrammar, judge

    class Tok:
        TEXT = {7: "1", 8: "2", 9: ", ", 100: ";", 101: " "}

        def decode(self, ids):
            return self.TEXT[ids[0]]

    m = make_tiny("llama")
    g = NumberListGrammar(Tok(), [3])
    res = sample(
        m, PROMPTS * 4, 40, seed=1, stop_ids=[3], allowed_ids=[7, 8, 9, 100, 101], grammar=g
    )
    texts = ["".join(Tok.TEXT[t] for t in s.token_ids if t != 3) for s in res]
    assert all(judge(t, s.stopped).ok for t, s in zip(texts, res, strict=True) if s.stopped)
    assert all(g.prefix_ok(t) for t in texts)  # the truncated rows too
    assert sum(s.stopped for s in res) >= 8 and len(set(texts)) > 8  # not vacuous
