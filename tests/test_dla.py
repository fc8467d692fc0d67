"""Direct logit attribution: centring, norm scale, hooks where it does not apply."""

from __future__ import annotations

import pytest
import torch

from steerdiff.interpret.dla import (
    DLAError,
    direct_logit_attribution,
    dla_scores,
    dla_table,
    logit_basis,
    norm_scale_vector,
    overlap,
)
from steerdiff.vectors import VectorSet, VectorSetError


def _centred_wu(model) -> torch.Tensor:
    w = model.get_output_embeddings().weight.detach().float()
    return w - w.mean(0, keepdim=True)


def test_centred_dla_of_unembedding_direction_puts_token_top(tiny):
    w_c = _centred_wu(tiny)
    t = int(w_c.norm(dim=1).argmax())  # the longest centred row: top by Cauchy-Schwarz
    r = direct_logit_attribution(
        tiny, w_c[t], hook="blocks.2.hook_resid_post", k=5, norm_scale=False
    )
    assert r.top[0].token_id == t
    assert r.bottom[0].score < 0 < r.top[0].score
    assert r.top[0].score == pytest.approx(float(w_c[t] @ w_c[t]), rel=1e-4)


def test_norm_scale_folds_in_final_norm_weight(tiny):
    """With the norm scale, v = W_c[t] / gamma has DLA W_c @ W_c[t] (RMSNorm families)."""
    gamma, centres = norm_scale_vector(tiny)
    if centres:  # gpt2 LayerNorm: gamma is its weight; the basis also removes v's mean
        assert torch.allclose(gamma, tiny.transformer.ln_f.weight.float())
        b = logit_basis(tiny, center=True, norm_scale=True)
        assert torch.allclose(b @ torch.ones(b.shape[1]), torch.zeros(b.shape[0]), atol=1e-4)
        return
    w_c = _centred_wu(tiny)
    t = int(w_c.norm(dim=1).argmax())
    s = dla_scores(tiny, w_c[t] / gamma, hook="blocks.1.hook_resid_post")
    assert torch.allclose(s, w_c @ w_c[t], rtol=1e-3, atol=1e-3)


def test_gemma_norm_scale_is_one_plus_weight():
    from conftest import make_tiny

    m = make_tiny("gemma2")
    gamma, _ = norm_scale_vector(m)
    assert torch.allclose(gamma, 1 + m.model.norm.weight.float(), rtol=1e-4)


def test_centring_removes_constant_shift_and_keeps_ranking(tiny_lm):
    torch.manual_seed(0)
    v = torch.randn(tiny_lm.model.config.hidden_size)
    c = dla_scores(tiny_lm, v, center=True)
    u = dla_scores(tiny_lm, v, center=False)
    assert abs(float(c.mean())) < 1e-4
    shift = u - c
    assert torch.allclose(shift, shift[0].expand_as(shift), atol=1e-4)  # a constant
    rc = direct_logit_attribution(tiny_lm, v, k=20, center=True)
    ru = direct_logit_attribution(tiny_lm, v, k=20, center=False)
    assert overlap(rc, ru) == 20


def test_vectorset_hook_selection_and_table(tiny_lm):
    d = tiny_lm.model.config.hidden_size
    vs = VectorSet.for_model(
        tiny_lm,
        {"blocks.1.hook_resid_post": torch.randn(d), "blocks.0.attn.hook_q": torch.randn(64)},
    )
    with pytest.raises(DLAError, match="say which"):
        direct_logit_attribution(tiny_lm, vs)
    r = direct_logit_attribution(tiny_lm, vs, hook="blocks.1.hook_resid_post", k=3)
    assert len(r.top) == 3 and len(r.bottom) == 3
    results, skipped = dla_table(tiny_lm, vs, k=3)
    assert [x.hook for x in results] == ["blocks.1.hook_resid_post"]
    assert "lens" in skipped["blocks.0.attn.hook_q"]


@pytest.mark.parametrize(
    "hook",
    [
        "blocks.0.attn.hook_q",
        "blocks.0.attn.hook_v",
        "blocks.1.ln1.hook_normalized",
        "blocks.1.ln2.hook_normalized",
    ],
)
def test_non_residual_hooks_point_to_the_lens(tiny_lm, hook):
    from steerdiff.hooks import hook_dim

    v = torch.randn(hook_dim(tiny_lm.model, hook))
    with pytest.raises(DLAError, match="activation-difference lens"):
        direct_logit_attribution(tiny_lm, {hook: v})


def test_vector_for_another_model_is_rejected(tiny_lm):
    other = VectorSet(
        {"blocks.1.hook_resid_post": torch.randn(32)}, {"d_model": 32, "model_id": "x"}
    )
    with pytest.raises(VectorSetError, match="d_model"):
        direct_logit_attribution(tiny_lm, other)
    with pytest.raises(VectorSetError, match="d_model=64"):
        direct_logit_attribution(tiny_lm, torch.randn(32))


@pytest.mark.slow
def test_smollm_owl_direction_reads_owl(smollm):
    w = smollm.model.get_output_embeddings().weight.detach()
    t = smollm.tokenizer(" owl").input_ids[0]
    v = w[t] - w.mean(0)
    r = direct_logit_attribution(smollm, v, hook="blocks.29.hook_resid_post", k=5)
    assert r.top[0].token == " owl"
    assert {x.token.strip().lower() for x in r.top[:4]} == {"owl", "owls"}


def test_planted_vector_fitted_by_distillation_reads_the_same(tiny_lm):
    """Small planted run: teacher = model + v* at one hook; a vector fitted there (Adam,
    KL to the teacher's next-token distributions on random token sequences) has a centred
    DLA whose top 20 tokens overlap v*'s by at least 10."""
    from steerdiff.hooks import steer

    m, hook = tiny_lm.model, "blocks.1.hook_resid_post"
    g = torch.Generator().manual_seed(0)
    v_star = torch.randn(64, generator=g)
    v_star = 6.0 * v_star / v_star.norm()
    x = torch.randint(1, 256, (16, 12), generator=g)  # [batch, pos]
    with torch.no_grad(), steer(m, {hook: v_star}):
        p_teacher = torch.log_softmax(m(x).logits, -1)  # [batch, pos, vocab]
    v = torch.zeros(64, requires_grad=True)
    opt = torch.optim.Adam([v], lr=0.3)
    for _ in range(40):
        with steer(m, {hook: v}):
            logq = torch.log_softmax(m(x).logits, -1)
        loss = torch.nn.functional.kl_div(logq, p_teacher, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    fitted = direct_logit_attribution(tiny_lm, v.detach(), hook, k=20)
    planted = direct_logit_attribution(tiny_lm, v_star, hook, k=20)
    assert overlap(fitted, planted) >= 10


@pytest.mark.slow
def test_cli_read_dla(smollm, tmp_path):
    from typer.testing import CliRunner

    from steerdiff.cli import app

    w = smollm.model.get_output_embeddings().weight.detach()
    t = smollm.tokenizer(" owl").input_ids[0]
    path = VectorSet.for_model(smollm, {"blocks.29.hook_resid_post": w[t] - w.mean(0)}).save(
        tmp_path / "v.safetensors"
    )
    r = CliRunner().invoke(app, ["read", "dla", str(path), "--out", str(tmp_path / "o"), "-k", "5"])
    assert r.exit_code == 0, r.output
    import json

    d = json.loads((tmp_path / "o" / "dla.json").read_text())
    assert d["results"][0]["top"][0]["token"] == " owl"
    assert (tmp_path / "o" / "dla_blocks.29.hook_resid_post.png").exists()
    bad = VectorSet({"blocks.1.hook_resid_post": torch.randn(32)}, {"d_model": 32}).save(
        tmp_path / "b.safetensors"
    )
    r = CliRunner().invoke(app, ["read", "dla", str(bad), "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "d_model" in r.output


def test_cli_read_dla_on_a_nan_vector_file_is_one_line(tmp_path):
    """Bug caught: `read dla` on a NaN vector file exiting 0 with junk tokens. It exits 2
    with one line naming the file and the hook, and writes nothing."""
    import math

    from _read_helpers import one_line_error, tiny_model_folder
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from steerdiff.cli import app

    folder = tiny_model_folder(tmp_path / "m")
    path = tmp_path / "nan.safetensors"
    v = torch.randn(64)
    v[7] = math.nan
    save_file({"blocks.1.hook_resid_post": v}, str(path))
    out = tmp_path / "o"
    r = CliRunner().invoke(
        app, ["read", "dla", str(path), "--model", str(folder), "--out", str(out)]
    )
    line = one_line_error(r)
    assert f"blocks.1.hook_resid_post in {path} holds 1 NaN" in line
    assert not out.exists()
