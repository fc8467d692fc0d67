"""Fitting in an SAE's latent basis (FitConfig basis "sae", fit.latent): the student steers
with v = z @ W_dec exactly as a vector fit steers with v, the L1 penalty is the documented
sum and makes codes sparser, a latent fit trains and writes an ordinary VectorSet plus its
code, and bad settings (no SAE, other hooks, l1 < 0, a resume with another l1 or SAE file)
are one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY
from pydantic import ValidationError
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

import steerdiff.models as models
from steerdiff.cli import app
from steerdiff.fit import Example, FitConfig, FitError, annotate_topk, collate, fit
from steerdiff.fit.latent import (
    LatentStudent,
    code_key,
    code_l0,
    compare_with_pullback,
    load_latent_code,
)
from steerdiff.fit.students import VectorStudent
from steerdiff.models import wrap_model
from steerdiff.sae import SAE, save_sae
from steerdiff.vectors import VectorSet

torch.set_num_threads(1)
HOOK = "blocks.1.hook_resid_post"
D_SAE = 96
QUICK = dict(
    hooks=[HOOK],
    batch_size=8,
    epochs=2,
    val_size=8,
    lr=0.1,
    lr_units="absolute",
    schedule="constant",
    warmup_steps=0,
    converge_tol=0,
    objective="distill",
    progress=False,
)


def peaky_tiny(seed: int = 0) -> torch.nn.Module:
    cfg = AutoConfig.for_model("llama", **TINY, initializer_range=0.2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)


def random_sae(seed: int = 0, hook: str = HOOK) -> SAE:
    """d_in 64, 96 latents; decoder rows of norms 0.5..2 (not unit: the penalty's weights)."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(D_SAE, 64, generator=g)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True) * torch.linspace(0.5, 2.0, D_SAE)[:, None]
    return SAE(
        W_enc=w_dec.T.clone(),
        b_enc=torch.zeros(D_SAE),
        W_dec=w_dec,
        b_dec=torch.zeros(64),
        hook=hook,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Teacher = peaky tiny + 12 x latent 7's direction at HOOK; 48 rows with top-k 16; the
    SAE saved as a SAELens folder."""
    m = peaky_tiny()
    sae = random_sae()
    folder = save_sae(sae, tmp_path_factory.mktemp("sae") / "sae")
    v = 12.0 * sae.W_dec[7] / sae.W_dec[7].norm()
    g = torch.Generator().manual_seed(1)
    exs = []
    for _ in range(48):
        p = torch.randint(2, 256, (6,), generator=g).tolist()
        exs.append(Example(p, torch.randint(2, 256, (5,), generator=g).tolist()))
    annotate_topk(m, exs, {"kind": "steered", "vectors": {HOOK: v}}, k=16)
    return m, sae, str(folder), exs


def test_student_vector_is_code_times_decoder_and_steers_like_that_vector(setup):
    """Bug caught: the latent student steering with something else than z @ W_dec (e.g. the
    normalised decoder rows, or a stale vector from before the last step), so its losses
    differ from a vector fit's with the same vector."""
    m, sae, _, exs = setup
    cfg = FitConfig(basis="sae", sae="x", **QUICK)
    student = LatentStudent(m, sae, cfg)
    with torch.no_grad():
        student.code.copy_(torch.randn(D_SAE, generator=torch.Generator().manual_seed(2)))
    v = student.code.detach() @ sae.W_dec
    torch.testing.assert_close(student.vector().detach(), v, atol=1e-6, rtol=0)
    plain = VectorStudent(m, {HOOK: v.clone()}, cfg)
    batch = collate(exs[:8], 0)
    for key in (None, ("val", 0)):
        ce_l, kl_l = student.losses(batch, key, "distill")
        ce_v, kl_v = plain.losses(batch, key, "distill")
        torch.testing.assert_close(ce_l.detach(), ce_v, atol=1e-6, rtol=0)
        torch.testing.assert_close(kl_l.detach(), kl_v, atol=1e-6, rtol=0)
    with torch.no_grad():  # a new code after a step: the student steers with the new vector
        student.code.mul_(-0.5)
    ce_l, _ = student.losses(batch, ("val", 0), "distill")
    plain2 = VectorStudent(m, {HOOK: -0.5 * v}, cfg)
    torch.testing.assert_close(
        ce_l.detach(), plain2.losses(batch, None, "distill")[0], atol=1e-6, rtol=0
    )


def test_l1_penalty_is_the_documented_sum_and_its_gradient(setup):
    """Bug caught: a penalty without the decoder-row norms (or with squared z), or a gradient
    that does not push each coordinate toward 0 by l1 x ||W_dec[i]||."""
    m, sae, _, _ = setup
    student = LatentStudent(m, sae, FitConfig(basis="sae", sae="x", l1=0.03, **QUICK))
    z = torch.randn(D_SAE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        student.code.copy_(z)
    pen = student.penalty()
    hand = 0.03 * sum(abs(float(z[i])) * float(sae.W_dec[i].norm()) for i in range(D_SAE))
    assert float(pen.detach()) == pytest.approx(hand, rel=1e-5)
    pen.backward()
    want = 0.03 * torch.sign(z) * sae.W_dec.norm(dim=1)
    torch.testing.assert_close(student.code.grad, want, atol=1e-6, rtol=1e-5)


def test_l1_makes_the_code_sparse_and_finds_the_planted_latent(setup):
    """Bug caught: the loop dropping the student's penalty (not in the gradient): l1 then
    has no effect, the code with l1 = 0.01 is as dense as with l1 = 0 (L0 94 of 96, here
    measured 31 with it) and its top latent is not the planted 7 (92 without the penalty).
    (A far larger l1 drives the whole code to ~0: the L0 of what is left is not small,
    docs/sae-fit.md.)"""
    m, _, path, exs = setup
    summary, pens = {}, {}
    for l1 in (0.0, 0.01):  # the cosine schedule's last small steps let the code settle
        res = fit(m, exs, basis="sae", sae=path, l1=l1, **dict(QUICK, epochs=6, schedule="cosine"))
        summary[l1] = res.extra["latent_code"]["summary"][HOOK]
        pens[l1] = res.metrics[-1]["penalty"]
    assert summary[0.01]["l0"] < summary[0.0]["l0"] / 2, summary
    assert summary[0.01]["top"][0]["latent"] == 7
    assert pens[0.0] == 0.0 and pens[0.01] > 0.0


def test_latent_fit_lowers_loss_and_writes_a_vectorset_and_its_code(setup, tmp_path):
    """Bugs caught: a latent fit that does not train (the code's gradient lost between v and
    z), or whose vectors.safetensors holds the code [d_sae] instead of v = z @ W_dec [d_in]
    (it would not load on the model), or whose latent_code.safetensors disagrees with it."""
    m, sae, path, exs = setup
    out = tmp_path / "fit"
    res = fit(m, exs, basis="sae", sae=path, l1=1e-3, out_dir=out, **QUICK)
    first, last = res.metrics[0]["train_loss"], res.metrics[-1]["train_loss"]
    assert last < 0.8 * first, (first, last)
    vs = VectorSet.load(out / "vectors.safetensors")
    vs.check_fits(m)
    codes, meta = load_latent_code(out)
    assert codes[HOOK].shape == (D_SAE,)
    torch.testing.assert_close(vs[HOOK], codes[HOOK] @ sae.W_dec, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.vectors[HOOK], vs[HOOK])
    src = json.loads((out / "result.json").read_text())
    assert meta["sae"]["sha256"] == src["latent_code"]["sae"]["sha256"] == sae_sha(path)
    assert src["latent_code"]["summary"][HOOK]["l0"] == code_l0(codes[HOOK], sae)
    assert vs.metadata["fit_config"]["basis"] == "sae"


def sae_sha(path: str) -> str:
    from steerdiff.io import file_sha256

    return file_sha256(f"{path}/sae_weights.safetensors")


def test_compare_with_pullback_on_a_known_code(setup):
    """Bug caught: the comparison ranking latents by another order than the code's (e.g.
    ascending), or taking the cosine with the code itself instead of z @ W_dec."""
    _, sae, _, _ = setup
    code = torch.zeros(D_SAE)
    code[7], code[30] = 3.0, 1.0
    ordinary = code @ sae.W_dec
    c = compare_with_pullback(code, ordinary, sae, k=2)
    assert c["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert c["l0"] == 2 and c["top_code"][0] == 7
    assert set(c["top_code"]) == {7, 30}
    assert c["overlap_cosine"] == len({7, 30} & set(c["top_cosine"])) / 2


# ---------------------------------------------------------------- bad input

runner = CliRunner()


def one_line(r) -> str:
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    return lines[0]


def test_bad_settings_are_one_line(setup, tmp_path, monkeypatch):
    """Bugs caught: basis sae without an SAE failing later in a traceback, hooks other than
    the SAE's silently fitted (or the SAE's hook silently replacing them), a negative l1
    accepted (it rewards dense codes). Nothing is written to --out."""
    m, _, path, _ = setup
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 4)
    out = tmp_path / "out"
    monkeypatch.setattr(models, "load_model", lambda *a, **k: wrap_model(m, spec="tiny"))
    base = ["fit", "--data", str(data), "--out", str(out)]
    line = one_line(runner.invoke(app, [*base, "--basis", "sae"]))
    assert (
        line
        == "error: bad option: Value error, basis 'sae' needs sae: give --sae PATH (an SAE at the fit's hook)"
    )
    line = one_line(runner.invoke(app, [*base, "--basis", "sae", "--sae", path, "--l1", "-1"]))
    assert line == "error: bad option --l1: Value error, l1 must be >= 0 (0: no penalty), got -1.0"
    r = runner.invoke(
        app, [*base, "--basis", "sae", "--sae", path, "--hooks", "blocks.2.hook_resid_post"]
    )
    line = one_line(r)
    assert line.startswith("error: basis 'sae': --hooks ['blocks.2.hook_resid_post'] selects ")
    assert f"reads '{HOOK}'" in line and f"use --hooks {HOOK}" in line
    assert not out.exists()
    with pytest.raises(ValidationError, match="only read with basis 'sae'"):
        FitConfig(sae=path)


def test_resume_with_another_l1_or_sae_file_is_refused(setup, tmp_path):
    """Bug caught: a resume continuing a code under another penalty, or over another SAE
    saved at the same path (its codes mean other latents), mixing two fits."""
    m, _, _, exs = setup
    folder = save_sae(random_sae(), tmp_path / "sae")
    out = tmp_path / "fit"
    kw = dict(QUICK, max_steps=2, checkpoint_every=1)
    fit(m, exs, basis="sae", sae=str(folder), l1=1e-3, out_dir=out, **kw)
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(FitError, match=r"\(l1: 0.001 -> 0.01\)"):
        fit(m, exs, basis="sae", sae=str(folder), l1=0.01, out_dir=out, resume=True, **kw)
    save_sae(random_sae(seed=5), folder)  # another SAE, same path
    with pytest.raises(FitError, match=r"\(sae_sha256: \"[0-9a-f]{64}\" -> \"[0-9a-f]{64}\"\)"):
        fit(m, exs, basis="sae", sae=str(folder), l1=1e-3, out_dir=out, resume=True, **kw)
    assert (out / "checkpoint.pt").read_bytes() == before
    assert code_key(HOOK) in torch.load(out / "checkpoint.pt", weights_only=False)["params"]
