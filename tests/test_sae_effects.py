"""interpret.sae_effects: the mean change of each SAE latent (changed - base) on text, for a
vector set and for a finetune, against a direct computation; a planted direction; errors."""

from __future__ import annotations

import pytest
import torch
from _read_helpers import ByteTok
from conftest import make_tiny

from steerdiff.hooks import record, steer
from steerdiff.interpret.lens import LensError
from steerdiff.interpret.sae_effects import LatentEffects, latent_effects
from steerdiff.models import wrap_model
from steerdiff.sae import SAE, SAEError
from steerdiff.vectors import VectorSet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["hello there, world", "ab", "the quick brown fox jumps", "owls at night", "xyz"]
HOOK = "blocks.2.hook_resid_pre"


@pytest.fixture
def lm(tiny_lm):
    tiny_lm.tokenizer = ByteTok()
    return tiny_lm


def _sae(d_in: int = 64, d_sae: int = 48, seed: int = 0, hook: str = HOOK) -> SAE:
    g = torch.Generator().manual_seed(seed)
    return SAE(
        W_enc=torch.randn(d_in, d_sae, generator=g),
        b_enc=0.1 * torch.randn(d_sae, generator=g),
        W_dec=torch.randn(d_sae, d_in, generator=g),
        b_dec=0.1 * torch.randn(d_in, generator=g),
        hook=hook,
    )


def _direct(base, changed, sae, texts, k, max_tokens, skip_first, vs=None, coeff=1.0):
    """Per text, unbatched (no padding): encode base and changed activations at the SAE's
    hook, difference, and average per position 0..k-1 and over positions >= skip_first."""
    pos = [[] for _ in range(k)]
    allv, basev = [], []
    for t in texts:
        x = torch.tensor([ByteTok()(t)["input_ids"][:max_tokens]])
        with torch.no_grad(), record(base, [HOOK]) as r0:
            base(x)
        if vs is not None:
            with torch.no_grad(), record(base, [HOOK]) as r1, steer(base, vs, coeff=coeff):
                base(x)
        else:
            with torch.no_grad(), record(changed, [HOOK]) as r1:
                changed(x)
        z0, z1 = sae.encode(r0[HOOK][0]), sae.encode(r1[HOOK][0])  # [L, d_sae]
        d = z1 - z0
        for p in range(min(k, d.shape[0])):
            pos[p].append(d[p])
        allv.append(d[skip_first:])
        basev.append(z0[skip_first:])
    return (
        torch.stack([torch.stack(p).mean(0) for p in pos]),
        torch.cat(allv).mean(0),
        torch.cat(basev).mean(0),
    )


def test_vector_effects_equal_a_direct_computation_with_padding(lm):
    """Bug caught: padded positions counted in the means (texts of 2 to 25 tokens in
    batches of 2), the first token not skipped in the all-position mean, or the change
    taken as encode(changed - base) instead of encode(changed) - encode(base).
    Mutations tried: the lens' _Acc.add mask dropped (`ma = torch.ones_like(m)`) ->
    base_all_mean not close; `difference` returning sae.encode(changed - base) -> pos_mean
    not close."""
    g = torch.Generator().manual_seed(1)
    vs = VectorSet.for_model(lm, {"blocks.1.hook_resid_mid": 2.0 * torch.randn(64, generator=g)})
    sae = _sae()
    eff = latent_effects(
        lm, sae, TEXTS, vectors=vs, coeff=1.5, first_k=3, max_tokens=20, batch_size=2
    )
    pos, allm, base = _direct(lm.model, None, sae, TEXTS, 3, 20, 1, vs=vs, coeff=1.5)
    assert eff.pos_mean.shape == (3, 48) and eff.all_mean.shape == (48,)
    torch.testing.assert_close(eff.pos_mean, pos, rtol=0, atol=1e-5)
    torch.testing.assert_close(eff.all_mean, allm, rtol=0, atol=1e-5)
    torch.testing.assert_close(eff.base_all_mean, base, rtol=0, atol=1e-5)
    assert eff.n_tokens == sum(min(len(t), 20) - 1 for t in TEXTS)
    assert eff.n_texts == 5 and eff.hook == HOOK
    top = eff.top(3)
    assert [r["latent"] for r in top] == torch.argsort(allm, descending=True)[:3].tolist()
    assert eff.top(2, direction="down")[0]["latent"] == int(allm.argmin())
    assert eff.rank(top[0]["latent"]) == 1 and eff.rank(int(allm.argmin())) == 48
    fk = eff.top(1, where="first_k")[0]
    assert fk["latent"] == int(pos.mean(0).argmax())
    back = LatentEffects.from_dict(eff.to_dict())
    assert torch.equal(back.all_mean, eff.all_mean) and back.top(3) == top


def test_a_vector_along_a_planted_encoder_row_raises_that_latent_most(lm):
    """Bug caught: the change computed for the wrong hook, signs flipped (changed and base
    swapped), or latents mis-indexed. The SAE's latent 7 reads exactly the steering
    direction (its encoder row), so steering along it raises latent 7 the most.
    Mutation tried: `torch.cat([z0 - z1, ...])` (base - changed) -> latent 7 ranks last."""
    sae = _sae()
    direction = sae.W_enc[:, 7] / sae.W_enc[:, 7].norm()
    sae.b_enc += 3.0  # every latent in its linear range
    vs = VectorSet.for_model(lm, {"blocks.1.hook_resid_post": 4.0 * direction})
    eff = latent_effects(lm, sae, TEXTS, vectors=vs, first_k=2, max_tokens=16)
    assert eff.rank(7) == 1 and eff.top(1)[0]["latent"] == 7
    assert eff.rank(7, where="first_k") == 1
    # the raw activation difference at the hook is the vector itself (recorded after it)
    torch.testing.assert_close(
        torch.tensor(eff.meta["act_diff_all_mean"]), 4.0 * direction, rtol=0, atol=1e-4
    )


def test_finetune_effects_equal_a_direct_computation(lm):
    """Bug caught: the finetune's and the base's roles swapped, or the finetune's
    activations read from the base model. Mutation tried: finetuned mode recording the
    base model twice (`record(hf, ...)` for r1) -> every change 0, the test fails."""
    other = make_tiny("llama", seed=3)
    ft = wrap_model(other, ByteTok(), spec="tiny-ft")
    sae = _sae()
    eff = latent_effects(lm, sae, TEXTS, finetuned=ft, first_k=2, max_tokens=12, batch_size=3)
    pos, allm, base = _direct(lm.model, other, sae, TEXTS, 2, 12, 1)
    torch.testing.assert_close(eff.pos_mean, pos, rtol=0, atol=1e-5)
    torch.testing.assert_close(eff.all_mean, allm, rtol=0, atol=1e-5)
    torch.testing.assert_close(eff.base_all_mean, base, rtol=0, atol=1e-5)
    assert eff.meta["mode"] == "finetuned"


def test_bad_inputs_are_one_line_errors(lm):
    """Bugs caught: a vector after the SAE's hook silently read as 'no effect'; an SAE of
    another width failing deep in a matmul; neither or both of vectors/finetuned accepted.
    Mutation tried: check_reaches removed -> no error, all changes 0."""
    vs = VectorSet.for_model(lm, {"blocks.2.hook_resid_post": torch.ones(64)})
    with pytest.raises(
        SAEError, match="after the SAE's hook blocks.2.hook_resid_pre, so it changes nothing"
    ):
        latent_effects(lm, _sae(), TEXTS, vectors=vs)
    with pytest.raises(SAEError, match="d_in=32 but hook 'blocks.2.hook_resid_pre' .* 64 wide"):
        latent_effects(lm, _sae(d_in=32), TEXTS, vectors=vs)
    with pytest.raises(LensError, match="exactly one of vectors"):
        latent_effects(lm, _sae(), TEXTS)
    with pytest.raises(LensError, match="exactly one of vectors"):
        latent_effects(lm, _sae(), TEXTS, vectors=vs, finetuned=lm)
    with pytest.raises(SAEError, match="where='middle'"):
        LatentEffects("h", 1, torch.zeros(1, 3), torch.zeros(3), torch.zeros(3), 1, 1).top(
            where="middle"
        )


def test_a_change_without_a_vector_at_the_hook_decomposes_the_lens_mean_difference(lm):
    """Bug caught: for q/k/v biases (no vector at the SAE's hook) the wrong slice of the
    lens' output decomposed (e.g. the base latents instead of the raw activation
    difference), or the vector's own direction used. The raw mean difference must equal
    the activation-difference lens' own all-position mean at the hook.
    Mutation tried: act_diff_all_mean sliced as allm[d_sae : 2 * d_sae] (the base latents)
    -> decompose_vector's width error here (and the planted test's check fails)."""
    from steerdiff.interpret.lens import activation_difference_lens
    from steerdiff.interpret.sae_read import read_in_latents

    g = torch.Generator().manual_seed(2)
    vs = VectorSet.for_model(lm, {"blocks.0.attn.hook_v": 3.0 * torch.randn(32, generator=g)})
    sae = _sae(hook="blocks.1.hook_resid_post")
    data = read_in_latents(
        lm, sae, vs, texts=TEXTS, max_tokens=16, first_k=2, top=4, n_dashboards=1
    )
    lens = activation_difference_lens(
        lm, TEXTS, vectors=vs, hooks=[sae.hook], max_tokens=16, first_k=2, skip_first=1
    )
    d = lens.all_mean[sae.hook]
    dec = data["decomposition"]
    assert dec["of"] == "mean activation difference" and dec["norm"] == pytest.approx(
        float(d.norm()), rel=1e-5
    )
    cos = (sae.W_dec @ d) / (sae.W_dec.norm(dim=1) * d.norm())
    assert [r["latent"] for r in dec["top"]] == cos.argsort(descending=True)[:4].tolist()
    assert data["dashboards"][0]["latent"] == data["effects_top"]["all"]["up"][0]["latent"]
