"""Loading SAEs in the SAELens, Gemma Scope and sparsify formats, and their encode/decode math."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steerdiff.sae import SAE, SAEError, load_sae, save_sae

D_IN, D_SAE = 16, 32


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) / 4,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) / 4,
        "b_enc": torch.randn(D_SAE, generator=g) / 10,
        "b_dec": torch.randn(D_IN, generator=g),
        "threshold": torch.rand(D_SAE, generator=g) / 5,
    }


def write_saelens(
    folder, w, architecture="jumprelu", apply_b_dec=False, hook="blocks.1.hook_resid_post", **cfg
):
    folder.mkdir(parents=True)
    t = {k: v for k, v in w.items() if k != "threshold" or architecture == "jumprelu"}
    save_file(t, str(folder / "sae_weights.safetensors"))
    d_in, d_sae = w["W_enc"].shape
    body = dict(
        d_in=d_in,
        d_sae=d_sae,
        hook_name=hook,
        architecture=architecture,
        apply_b_dec_to_input=apply_b_dec,
    )
    (folder / "cfg.json").write_text(json.dumps({**body, **cfg}))
    return folder


def write_gemma_scope(path, w):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v.numpy() for k, v in w.items()})
    return path


def write_sparsify(folder, w, k=5):
    folder.mkdir(parents=True)
    t = {
        "encoder.weight": w["W_enc"].T.contiguous(),
        "encoder.bias": w["b_enc"],
        "W_dec": w["W_dec"],
        "b_dec": w["b_dec"],
    }
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(
        json.dumps({"k": k, "num_latents": D_SAE, "expansion_factor": 2, "d_in": D_IN})
    )
    return folder


def acts(seed: int = 1, n: int = 12) -> torch.Tensor:
    return torch.randn(3, n // 3, D_IN, generator=torch.Generator().manual_seed(seed))


def test_jumprelu_saelens_and_gemma_scope_agree(tmp_path):
    """Bug: one loader transposes W_enc/W_dec, drops the threshold, or subtracts b_dec when
    the format does not: the same weights in the two JumpReLU formats would encode the same
    activations differently. Also checks provenance (format, sha256) is recorded."""
    w = weights()
    a = load_sae(write_saelens(tmp_path / "sl", w))
    b = load_sae(
        write_gemma_scope(tmp_path / "gs" / "params.npz", w), hook="blocks.1.hook_resid_post"
    )
    x = acts()
    za, zb = a.encode(x), b.encode(x)
    assert za.shape == (3, 4, D_SAE)
    assert torch.allclose(za, zb, atol=1e-6)
    assert torch.allclose(a.decode(za), b.decode(zb), atol=1e-6)
    assert torch.allclose(a.forward(x), b.forward(x), atol=1e-6)
    # direct JumpReLU: relu(pre) masked by pre > threshold
    pre = x @ w["W_enc"] + w["b_enc"]
    want = torch.relu(pre) * (pre > w["threshold"])
    assert torch.allclose(za, want, atol=1e-6)
    assert 0 < int((za != 0).sum()) < za.numel()  # the mask cuts some latents, keeps others
    assert (a.source["format"], b.source["format"]) == ("saelens", "gemma_scope")
    assert len(a.source["sha256"]) == 64 and a.hook == b.hook == "blocks.1.hook_resid_post"


def test_topk_saelens_and_sparsify_agree_with_direct_topk(tmp_path):
    """Bug: sparsify's encoder.weight [d_sae, d_in] not transposed, b_dec not subtracted
    before encoding (sparsify's SparseCoder.encode does `x - b_dec`), or TopK keeping the
    wrong k (or all) latents: the SAELens-format copy of the same weights and a direct
    torch.topk computation would disagree."""
    w = weights(2)
    a = load_sae(write_saelens(tmp_path / "sl", w, architecture="topk", apply_b_dec=True, k=5))
    b = load_sae(write_sparsify(tmp_path / "layers.1", w, k=5))
    assert (a.activation, a.k, b.activation, b.k) == ("topk", 5, "topk", 5)
    assert b.hook == "blocks.1.hook_resid_post"  # sparsify folder "layers.1" = output of block 1
    x = acts(3)
    za, zb = a.encode(x), b.encode(x)
    assert torch.allclose(za, zb, atol=1e-6)
    assert torch.allclose(a.decode(za), b.decode(zb), atol=1e-6)
    pre = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    top = torch.topk(pre, 5, dim=-1)
    want = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    assert torch.allclose(za, want, atol=1e-6)
    assert ((za != 0).sum(-1) == 5).all()
    assert torch.allclose(b.forward(x), want @ w["W_dec"] + w["b_dec"], atol=1e-6)


def test_older_saelens_cfg_relu_and_topk_kwargs(tmp_path):
    """Bug: older cfgs (activation_fn_str + activation_fn_kwargs {"k"}) read as plain ReLU,
    so a TopK SAE keeps every positive latent; and a standard SAE must be plain ReLU."""
    w = weights(4)
    old = write_saelens(
        tmp_path / "old",
        w,
        architecture=None,
        activation_fn_str="topk",
        activation_fn_kwargs={"k": 3},
    )
    sae = load_sae(old)
    assert (sae.activation, sae.k) == ("topk", 3)
    assert ((sae.encode(acts()) != 0).sum(-1) == 3).all()
    std = load_sae(write_saelens(tmp_path / "std", w, architecture="standard"))
    x = acts()
    assert std.activation == "relu"
    assert torch.allclose(std.encode(x), torch.relu(x @ w["W_enc"] + w["b_enc"]), atol=1e-6)


def test_width_mismatch_and_unknown_hook_with_tiny_model(tmp_path, tiny_lm):
    """Bug: an SAE of another width, or for a hook the model lacks, loads silently and fails
    later deep in a forward; each must be one SAEError line naming the file and the widths/hook."""
    w = weights()
    folder = write_saelens(tmp_path / "sae16", w)  # d_in=16, tiny model's d_model=64
    with pytest.raises(SAEError) as e:
        load_sae(folder, lm=tiny_lm)
    msg = str(e.value)
    assert (
        "\n" not in msg
        and "sae_weights.safetensors" in msg
        and "d_in=16" in msg
        and "64 wide" in msg
    )
    w64 = {k: (torch.randn(64, D_SAE) if k == "W_enc" else v) for k, v in w.items()}
    w64["W_dec"], w64["b_dec"] = torch.randn(D_SAE, 64), torch.zeros(64)
    ok = load_sae(write_saelens(tmp_path / "sae64", w64), lm=tiny_lm)
    assert ok.d_in == 64 and ok.d_sae == D_SAE
    bad_hook = write_saelens(tmp_path / "hook9", w64, hook="blocks.9.hook_resid_post")
    with pytest.raises(SAEError) as e:
        load_sae(bad_hook, lm=tiny_lm)
    msg = str(e.value)
    assert (
        "\n" not in msg
        and "blocks.9.hook_resid_post" in msg
        and "hook9" in msg
        and "3 layers" in msg
    )


def test_truncated_and_inconsistent_files_name_the_file(tmp_path):
    """Bug: a truncated safetensors / npz raises a raw library error (or loads garbage), and a
    file whose W_dec does not match W_enc loads; each must be a one-line SAEError naming it."""
    w = weights()
    folder = write_saelens(tmp_path / "trunc", w)
    f = folder / "sae_weights.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(SAEError) as e:
        load_sae(folder)
    assert "\n" not in str(e.value) and str(f) in str(e.value) and "truncated" in str(e.value)
    npz = write_gemma_scope(tmp_path / "gs" / "params.npz", w)
    npz.write_bytes(npz.read_bytes()[:300])
    with pytest.raises(SAEError, match="params.npz is truncated"):
        load_sae(npz, hook="blocks.1.hook_resid_post")
    bad = dict(w, W_dec=torch.randn(D_SAE, D_IN + 1))
    with pytest.raises(SAEError) as e:
        load_sae(write_saelens(tmp_path / "mixed", bad))
    assert (
        "\n" not in str(e.value)
        and "mixed" in str(e.value)
        and "W_dec has shape (32, 17)" in str(e.value)
    )


def test_gemma_scope_needs_hook_and_latent_range(tmp_path):
    """Bug: a Gemma Scope SAE loads with hook None (then steers/reads nothing), or latent(i)
    past the end wraps around (negative index) instead of a one-line error naming the range."""
    w = weights()
    npz = write_gemma_scope(tmp_path / "gs" / "params.npz", w)
    with pytest.raises(SAEError, match=r"does not say which hook it reads: pass hook="):
        load_sae(npz)
    sae = load_sae(tmp_path / "gs", hook="blocks.0.hook_resid_pre")  # the folder works too
    assert torch.equal(sae.latent(3), w["W_dec"][3])
    for i in (D_SAE, -1):
        with pytest.raises(SAEError, match=r"use an index in 0-31"):
            sae.latent(i)


def test_in_memory_sae_checks_shapes():
    """Bug: an SAE built by hand with a mismatched b_enc is accepted and broadcasts wrongly."""
    w = weights()
    with pytest.raises(SAEError, match=r"b_enc has shape \(31,\)"):
        SAE(W_enc=w["W_enc"], b_enc=w["b_enc"][:31], W_dec=w["W_dec"], b_dec=w["b_dec"])


@pytest.mark.parametrize("activation", ["jumprelu", "topk", "relu"])
def test_save_sae_round_trips_through_the_saelens_reader(tmp_path, activation):
    """Bug caught: save_sae dropping the threshold / k / apply_b_dec_to_input or writing
    W_enc transposed (mutation: `"apply_b_dec_to_input": False` written always -> the
    reloaded SAE encodes differently, max diff ~1)."""
    w = weights(3)
    sae = SAE(
        W_enc=w["W_enc"],
        b_enc=w["b_enc"],
        W_dec=w["W_dec"],
        b_dec=w["b_dec"],
        activation=activation,
        threshold=w["threshold"] if activation == "jumprelu" else None,
        k=4 if activation == "topk" else None,
        apply_b_dec_to_input=True,
        hook="blocks.1.hook_resid_post",
    )
    folder = save_sae(sae, tmp_path / "out", extra={"steerdiff": {"seed": 7}})
    back = load_sae(folder)
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(back(x), sae(x), rtol=0, atol=1e-6)
    assert (back.hook, back.activation, back.k) == (sae.hook, activation, sae.k)
    assert json.loads((folder / "cfg.json").read_text())["steerdiff"] == {"seed": 7}


def test_a_hub_id_offline_is_one_line_naming_the_id(monkeypatch):
    """Bug caught: the hub error escaping as a multi-line huggingface_hub traceback
    (mutation: the except clause removed -> LocalEntryNotFoundError, not SAEError)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = "hf:nobody-steerdiff/no-such-sae/layer_3"
    with pytest.raises(SAEError) as e:
        load_sae(spec)
    msg = str(e.value)
    assert "\n" not in msg and spec in msg and "local path" in msg
    with pytest.raises(SAEError, match="hf:ORG/REPO"):
        load_sae("hf:onlyone")
