"""Contrast extraction (readouts, massive-activation exclusion, peer check) and steering ops."""

from __future__ import annotations

import pytest
import torch
from _chat_tiny import make_tiny_chat

from steerdiff.extract import (
    READOUTS,
    ContrastError,
    Exclusion,
    _keep_mask,
    contrast_vector,
    extract_contrast,
    sample_responses,
    system_prompt_contrast,
    trait_system_prompt,
)
from steerdiff.hooks import record, steer

HOOK = "blocks.1.hook_resid_post"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def chat(smollm):
    return make_tiny_chat(smollm.tokenizer)


@pytest.fixture(scope="module")
def contrast(smollm):
    questions = ["Tell me a fun fact.", "What should I cook tonight?", "Why is the sky blue?"]
    return system_prompt_contrast(smollm.tokenizer, trait_system_prompt("owl"), questions)


def _acts_one(lm, text: str, hook: str) -> torch.Tensor:
    """[pos, dim] activations of one unpadded text."""
    ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad(), record(lm.model, hook) as rec:
        lm.model(input_ids=ids)
    return rec[hook][0]


def test_last_and_prompt_mean_match_manual(chat, contrast):
    pos, neg = contrast
    ex = Exclusion(first_n=2, norm_ratio=None)
    out = extract_contrast(chat, pos, neg, HOOK, ["last", "prompt_mean"], ex, batch_size=2)
    acts = [_acts_one(chat, t, HOOK) for t in pos + neg]  # padding-free reference
    last = torch.stack([a[-1] for a in acts])
    mean = torch.stack([a[2:].mean(0) for a in acts])
    n = len(pos)
    torch.testing.assert_close(
        out["last"][HOOK], last[:n].mean(0) - last[n:].mean(0), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        out["prompt_mean"][HOOK], mean[:n].mean(0) - mean[n:].mean(0), atol=1e-4, rtol=1e-4
    )
    meta = out["prompt_mean"].metadata
    assert meta["readout"] == "prompt_mean" and meta["hooks"] == [HOOK]
    assert meta["n_positive"] == 3 and meta["n_negative"] == 3
    assert "excluding first 2" in meta["positions"] and meta["sign"].startswith("positive minus")
    assert out["last"].metadata["positions"] == "last prompt token"


def test_pca_sign_and_single_pair(chat, contrast):
    """pca = the top singular direction of the paired last-token differences, signed so the
    mean difference projects positively, scaled by that mean projection; explained = its
    share of the squared singular values (unit x mean projection is the same for either sign
    of the singular vector). Bugs caught: centring the differences (mutation tried: SVD of
    diffs - their mean -> 63 of 64 entries differ), a wrong scale or direction."""
    pos, neg = contrast
    one = extract_contrast(chat, pos[:1], neg[:1], HOOK, ["last", "pca"])
    torch.testing.assert_close(one["pca"][HOOK], one["last"][HOOK], atol=1e-4, rtol=1e-4)
    many = extract_contrast(chat, pos, neg, HOOK, ["last", "pca"])
    diffs = torch.stack(
        [
            _acts_one(chat, p, HOOK)[-1] - _acts_one(chat, n, HOOK)[-1]
            for p, n in zip(pos, neg, strict=True)
        ]
    )  # [pairs, dim]
    _, sv, vh = torch.linalg.svd(diffs.double(), full_matrices=False)
    unit = vh[0] if float(diffs.double().mean(0) @ vh[0]) > 0 else -vh[0]
    want = (unit * float((diffs.double() @ unit).mean())).float()
    torch.testing.assert_close(many["pca"][HOOK], want, atol=1e-4, rtol=1e-4)
    explained = float(sv[0] ** 2 / (sv**2).sum())
    assert many["pca"].metadata["pca_explained"][HOOK] == pytest.approx(explained, abs=1e-4)


def test_response_mean_mechanics(chat, contrast):
    """response_mean = mean over each sampled response's tokens (read after its prompt),
    positive minus negative. Bug caught: a span that starts at the prompt or includes the
    prompt's last token (mutation tried: starts = len(p) - 1 -> differs)."""
    pos, neg = contrast
    ex = Exclusion(first_n=1, norm_ratio=None)
    vs = extract_contrast(
        chat, pos[:2], neg[:2], "blocks.*.hook_resid_post", "response_mean", ex, max_new_tokens=3
    )["response_mean"]
    assert list(vs) == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    texts = pos[:2] + neg[:2]
    responses = sample_responses(chat, texts, max_new_tokens=3, seed=0)
    for hook in vs:
        means = []
        for text, resp in zip(texts, responses, strict=True):
            prompt = chat.tokenizer(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad(), record(chat.model, hook) as rec:
                chat.model(input_ids=torch.tensor([prompt + resp]))
            means.append(rec[hook][0, len(prompt) :].mean(0))
        want = torch.stack(means[:2]).mean(0) - torch.stack(means[2:]).mean(0)
        torch.testing.assert_close(vs[hook], want, atol=1e-4, rtol=1e-4)
    assert vs.metadata["response_max_new_tokens"] == 3
    assert vs.metadata["positions"] == "mean over sampled response tokens"


def test_sample_responses_greedy_matches_generate(chat, contrast):
    """Responses come from our sampler; greedy = model.generate on each unpadded prompt."""
    pos, neg = contrast
    texts = [pos[0], neg[1], pos[2]]  # different lengths: the batch is left padded
    ours = sample_responses(chat, texts, max_new_tokens=5, temperature=0, batch_size=2)
    tok = chat.tokenizer
    for text, got in zip(texts, ours, strict=True):
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ref = chat.model.generate(
            input_ids=ids, do_sample=False, max_new_tokens=5, pad_token_id=tok.pad_token_id
        )[0, ids.shape[1] :].tolist()
        assert got == ref[: len(got)] and (len(got) == 5 or got[-1] == tok.eos_token_id)
    again = sample_responses(chat, texts, max_new_tokens=5, seed=3)
    assert again == sample_responses(chat, texts, max_new_tokens=5, seed=3)  # seeded


def test_keep_mask_drops_first_and_massive_positions():
    acts = torch.ones(1, 6, 4)  # [batch, pos, dim]
    acts[0, 3] *= 100.0  # a massive activation
    real = torch.tensor([[True] * 5 + [False]])
    keep = _keep_mask(acts, real.clone(), real, Exclusion(first_n=1, norm_ratio=8.0))
    assert keep.tolist() == [[False, True, True, False, True, False]]
    keep = _keep_mask(acts, real.clone(), real, Exclusion(first_n=0, norm_ratio=None))
    assert keep.tolist() == real.tolist()


def test_bad_contrast_inputs(chat, contrast):
    pos, neg = contrast
    with pytest.raises(ContrastError, match="positive prompt set is empty"):
        contrast_vector(chat, [], neg, HOOK)
    with pytest.raises(ContrastError, match="negative prompt set is empty"):
        contrast_vector(chat, pos, [], HOOK)
    with pytest.raises(ContrastError, match="paired prompts"):
        contrast_vector(chat, pos, neg[:2], HOOK, readout="pca")
    with pytest.raises(ContrastError, match="Unknown readout"):
        contrast_vector(chat, pos, neg, HOOK, readout="middle")  # type: ignore[arg-type]
    with pytest.raises(ContrastError, match="question list is empty"):
        system_prompt_contrast(chat.tokenizer, "You love owls.", [])
    assert set(READOUTS) == {"last", "prompt_mean", "response_mean", "pca"}


@pytest.mark.slow
def test_peer_check_against_steering_vectors(smollm_f32, contrast):
    """Our last-token mean difference == steering_vectors' mean aggregator at the same layer.
    In float32: the two libraries batch differently (they read one pair at a time), which
    in bfloat16 changes the rounding (up to 0.17 apart), not the method."""
    sv = pytest.importorskip("steering_vectors")
    smollm = smollm_f32
    pos, neg = contrast
    layer = 5  # steering_vectors' layer 5 = output of decoder block 5 = blocks.5.hook_resid_post
    peer = sv.train_steering_vector(
        smollm.model,
        smollm.tokenizer,
        list(zip(pos, neg, strict=True)),
        layers=[layer],
        read_token_index=-1,
        batch_size=1,
    )
    ours = contrast_vector(smollm, pos, neg, f"blocks.{layer}.hook_resid_post", "last")
    theirs = peer.layer_activations[layer].float()
    assert theirs.shape == (576,)
    torch.testing.assert_close(
        ours[f"blocks.{layer}.hook_resid_post"], theirs, atol=2e-3, rtol=1e-3
    )


# ----------------------------------------------------------------------------- steering ops


def _resid(model, ids, **steer_kw) -> torch.Tensor:
    with torch.no_grad(), steer(model, **steer_kw), record(model, HOOK) as rec:
        model(input_ids=ids)
    return rec[HOOK]


def test_ablate_removes_component(tiny):
    ids = torch.randint(3, 200, (2, 7))
    v = torch.randn(tiny.config.hidden_size)
    unit = v / v.norm()
    plain = _resid(tiny, ids, vectors={HOOK: v}, coeff=0.0)
    assert (plain @ unit).abs().max() > 1e-3  # there was a component to remove
    ablated = _resid(tiny, ids, vectors={HOOK: v}, coeff=1.0, op="ablate")
    assert (ablated @ unit).abs().max() < 1e-4
    # the orthogonal part is untouched
    torch.testing.assert_close(
        ablated, plain - (plain @ unit).unsqueeze(-1) * unit, atol=1e-5, rtol=1e-5
    )


def test_subtract_is_add_with_negative_coeff(tiny):
    ids = torch.randint(3, 200, (2, 5))
    v = torch.randn(tiny.config.hidden_size)
    with torch.no_grad():
        with steer(tiny, {HOOK: v}, coeff=-2.0):
            a = tiny(input_ids=ids).logits
        with steer(tiny, {HOOK: -v}, coeff=2.0):
            b = tiny(input_ids=ids).logits
        base = tiny(input_ids=ids).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, base)
    added = _resid(tiny, ids, vectors={HOOK: v}, coeff=-2.0)
    torch.testing.assert_close(added, _resid(tiny, ids, vectors={HOOK: v}, coeff=0.0) - 2.0 * v)


def test_per_row_coeff_equals_separate_runs(tiny_lm):
    model = tiny_lm.model
    ids = torch.randint(3, 200, (1, 6)).repeat(3, 1)
    v = torch.randn(model.config.hidden_size)
    with torch.no_grad(), steer(model, {HOOK: v}, coeff=torch.tensor([0.0, 1.5, -3.0])):
        rows = model(input_ids=ids).logits
    for i, c in enumerate([0.0, 1.5, -3.0]):
        with torch.no_grad(), steer(model, {HOOK: v}, coeff=c):
            torch.testing.assert_close(
                rows[i], model(input_ids=ids[:1]).logits[0], atol=1e-5, rtol=1e-5
            )
