"""Whitened fits (fit.whitened, FitConfig whiten / whiten_penalty / whiten_max_norm): the
penalty is the documented sum of squared Mahalanobis norms with gradient 2 cov^-1 v, the cap
holds every vector at or inside the radius and leaves one inside untouched, a large penalty
shrinks the fitted vectors' whitened norm, "auto" Gaussians are kept for a resume, the
result records each vector's norms, and bad settings are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

import steerdiff.models as models
from steerdiff.cli import app
from steerdiff.fit import Example, FitConfig, FitError, annotate_topk, fit
from steerdiff.fit.students import VectorStudent
from steerdiff.fit.whitened import CACHE_FOLDER, WhitenedNorms, gaussian_file
from steerdiff.models import wrap_model
from steerdiff.whiten import Gaussian

torch.set_num_threads(1)
HOOK = "blocks.1.hook_resid_post"
HOOK2 = "blocks.2.hook_resid_post"
D = 64
WHASH = "tinyhash0001"
QUICK = dict(
    hooks=[HOOK],
    batch_size=8,
    epochs=3,
    val_size=8,
    converge_tol=0,
    objective="distill",
    progress=False,
)


def gaussian(hook: str = HOOK, seed: int = 0) -> Gaussian:
    """An anisotropic Gaussian at `hook` (variances 0.05..20 along a random basis), as if
    fitted on the tiny model (its weights hash)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    var = torch.logspace(np.log10(0.05), np.log10(20.0), D, dtype=torch.float64)
    cov = q @ torch.diag(var) @ q.T
    return Gaussian(hook, torch.zeros(D), cov, meta={"weights_hash": WHASH, "model": "tiny"})


@pytest.fixture(scope="module")
def setup():
    """A peaky tiny llama; its teacher = + 12 x a fixed unit vector at HOOK; 48 rows of
    random prompts / completions with the teacher's top-16 log-probs."""
    cfg = AutoConfig.for_model("llama", **TINY, initializer_range=0.2)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    lm = wrap_model(m, spec="tiny", weights_hash=WHASH)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(D, generator=g)
    v = 12.0 * v / v.norm()
    exs = []
    for _ in range(48):
        p = torch.randint(2, 256, (6,), generator=g).tolist()
        exs.append(Example(p, torch.randint(2, 256, (5,), generator=g).tolist()))
    annotate_topk(m, exs, {"kind": "steered", "vectors": {HOOK: v}}, k=16)
    return lm, exs


def test_penalty_is_the_sum_of_squared_mahalanobis_norms_and_its_gradient():
    """Bug caught: a penalty in the wrong metric (cov instead of cov^-1, e.g. W = L instead of
    L^-1), not squared, or summed over only one hook; a gradient other than
    2 x penalty x cov^-1 v (a detached norm gives none)."""
    gs = {HOOK: gaussian(HOOK, 0), HOOK2: gaussian(HOOK2, 1)}
    w = WhitenedNorms(gs, penalty=0.7)
    gen = torch.Generator().manual_seed(3)
    params = {h: torch.randn(D, generator=gen).requires_grad_(True) for h in gs}
    student = VectorStudent.__new__(VectorStudent)  # only its params and whitened are read
    student.params, student.whitened = params, w
    pen = student.penalty()
    hand = 0.0
    for h, v in params.items():
        c, x = gs[h].cov.numpy(), v.detach().double().numpy()
        hand += float(x @ np.linalg.solve(c, x))
    assert float(pen.detach()) == pytest.approx(0.7 * hand, rel=1e-6)
    pen.backward()
    for h, v in params.items():
        want = 2 * 0.7 * np.linalg.solve(gs[h].cov.numpy(), v.detach().double().numpy())
        np.testing.assert_allclose(v.grad.double().numpy(), want, rtol=1e-5, atol=1e-6)
    assert WhitenedNorms(gs, penalty=0.0).penalty(params) is None  # 0: no term, no backward


def test_cap_scales_outside_vectors_to_the_radius_and_leaves_inside_ones(setup, tmp_path):
    """Bug caught: the loop not applying the cap after each step (student.constrain() not
    called: the fitted norms end far beyond r), a cap in L2 instead of the whitened norm, or a
    cap that also rescales a vector already inside (it must be left bit for bit). The fit's
    result.json records each vector's final Mahalanobis and L2 norms."""
    gs = {HOOK: gaussian(HOOK, 0), HOOK2: gaussian(HOOK2, 1)}
    w = WhitenedNorms(gs, max_norm=2.0)
    out_v = torch.randn(D, generator=torch.Generator().manual_seed(4)) * 5
    in_v = out_v / float(gs[HOOK2].mahalanobis_norm(out_v))  # ||in_v||_M = 1 < 2
    params = {HOOK: out_v.clone(), HOOK2: in_v.clone()}
    w.constrain(params)
    assert float(gs[HOOK].mahalanobis_norm(params[HOOK])) == pytest.approx(2.0, rel=1e-6)
    assert float(torch.nn.functional.cosine_similarity(params[HOOK], out_v, 0)) > 1 - 1e-6
    assert torch.equal(params[HOOK2], in_v)

    lm, exs = setup
    folder = tmp_path / "gaussians"
    folder.mkdir()
    for h, g in gs.items():
        g.save(gaussian_file(folder, h))
    kw = dict(QUICK, hooks=[HOOK, HOOK2])
    plain = fit(lm, exs, whiten=str(folder), **kw)
    r = 0.5 * min(v["mahalanobis"] for v in plain.extra["whitened_norms"].values())
    out = tmp_path / "fit"
    res = fit(lm, exs, whiten=str(folder), whiten_max_norm=r, out_dir=out, **kw)
    saved = json.loads((out / "result.json").read_text())["whitened_norms"]
    for h in (HOOK, HOOK2):
        m = float(gs[h].mahalanobis_norm(res.vectors[h]))
        assert m <= r * (1 + 1e-5), (h, m, r)
        assert saved[h]["mahalanobis"] == pytest.approx(m, rel=1e-9)
        assert saved[h]["l2"] == pytest.approx(float(res.vectors[h].double().norm()), rel=1e-6)
        assert plain.extra["whitened_norms"][h]["mahalanobis"] >= 2 * r  # the cap did bind


def test_large_penalty_shrinks_the_whitened_norm(setup, tmp_path):
    """Bug caught: a penalty that does not reach the optimizer (not backpropagated: the same
    vector as without it) or whose sign is flipped (it grows the norm). Same seed and data;
    lr in activation units (the parameters are v itself: the penalty acts on v). Measured:
    |v|_M 17.0 without, 1.26 with whiten_penalty 0.01 (ratio 0.07)."""
    lm, exs = setup
    g = gaussian()
    path = g.save(tmp_path / "g.safetensors")
    norms = {}
    for lam in (0.0, 0.01):
        res = fit(lm, exs, whiten=str(path), whiten_penalty=lam, **QUICK)
        norms[lam] = float(g.mahalanobis_norm(res.vectors[HOOK]))
        assert res.extra["whitened_norms"][HOOK]["mahalanobis"] == pytest.approx(norms[lam])
        assert ("penalty" in res.metrics[-1]) == (lam > 0)
    assert norms[0.01] < 0.5 * norms[0.0], norms


def test_auto_gaussians_are_fitted_once_and_reused_on_resume(tmp_path, smollm, monkeypatch):
    """Bug caught: whiten "auto" refitting (or not keeping) its Gaussians, so a resumed fit
    measures in Gaussians made again instead of its start's; or reusing one made for another
    whiten_texts. The kept file is one of the hook on this model."""
    import steerdiff.fit.whitened as fw

    calls = []
    real = fw.fit_gaussians  # records the hooks it fits
    monkeypatch.setattr(fw, "fit_gaussians", lambda *a, **k: calls.extend(a[1]) or real(*a, **k))
    tok = smollm.tokenizer  # a real tokenizer for the corpus text; the model is tiny
    cfg = AutoConfig.for_model(
        "llama",
        num_hidden_layers=2,
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    lm = wrap_model(m, tokenizer=tok, spec="tiny-smol", weights_hash="smolhash")
    g = torch.Generator().manual_seed(0)
    exs = [Example(torch.randint(2, 500, (5,), generator=g).tolist(), [7, 8, 9]) for _ in range(8)]
    out = tmp_path / "fit"
    kw = dict(hooks=[HOOK], objective="sft", batch_size=4, val_size=2, progress=False)
    kw.update(whiten="auto", whiten_texts=6, whiten_penalty=0.1, max_steps=2, out_dir=out)
    fit(lm, exs, **kw)
    assert calls == [HOOK]
    kept = out / CACHE_FOLDER / f"{HOOK}.safetensors"
    gk = Gaussian.load(kept)
    assert (gk.hook, gk.meta["weights_hash"], gk.meta["whiten_texts"]) == (HOOK, "smolhash", 6)
    res = fit(lm, exs, resume=True, **kw)
    assert calls == [HOOK]  # read back, not fitted again
    assert res.extra["whiten_gaussians"][HOOK]["source"] == str(kept)
    fit(lm, exs, **{**kw, "whiten_texts": 7})  # made for 6 texts: fitted again
    assert calls == [HOOK, HOOK] and Gaussian.load(kept).meta["whiten_texts"] == 7


def test_resume_in_another_gaussian_is_refused(setup, tmp_path):
    """A fit resumed after its Gaussian file was replaced (same hook, same model, other
    covariance) would go on penalising in another metric: refused, naming whiten_sha256.
    Bug caught: the Gaussian's content not part of the resume identity (mutation tried:
    "whiten_sha256" left out of checkpoint.run_identity's keys -> the resume runs)."""
    lm, exs = setup
    path = gaussian(seed=0).save(tmp_path / "g.safetensors")
    kw = dict(QUICK, whiten=str(path), whiten_penalty=0.01, max_steps=2, out_dir=tmp_path / "f")
    fit(lm, exs, **kw)
    fit(lm, exs, resume=True, **kw)  # the same file: resumes
    gaussian(seed=1).save(path)
    with pytest.raises(FitError, match="whiten_sha256"):
        fit(lm, exs, resume=True, **kw)


# ---------------------------------------------------------------- bad input

runner = CliRunner()


def one_line(r) -> str:
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    return lines[0]


def test_bad_settings_are_one_line(setup, tmp_path, monkeypatch):
    """Bugs caught: a Gaussian of another hook or model used silently (its norms mean
    nothing for this vector) or failing after the data is scored; a penalty or cap without
    whiten ignored; a negative penalty (it rewards large vectors) or a cap <= 0 accepted; a
    folder missing a hook's file; --whiten on a LoRA baseline ignored. Nothing is written."""
    lm, _ = setup
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 4)
    out = tmp_path / "out"
    other_hook = gaussian(HOOK2).save(tmp_path / "other_hook.safetensors")
    g = gaussian()
    g.meta["weights_hash"] = "another00000"
    other_model = g.save(tmp_path / "other_model.safetensors")
    folder = tmp_path / "folder"
    folder.mkdir()
    gaussian().save(gaussian_file(folder, HOOK))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: lm)
    base = ["fit", "--data", str(data), "--out", str(out), "--hooks", HOOK]
    cases = [
        (
            ["--whiten", str(other_hook)],
            f"error: The Gaussian was fitted at {HOOK2}, not {HOOK}: fit one at {HOOK} "
            "(steerdiff.whiten.fit_gaussian).",
        ),
        (
            ["--whiten", str(other_model), "--whiten-penalty", "1"],
            f"error: The Gaussian at {HOOK} was fitted on model 'tiny' (weights another00000), "
            f"not on this one ({WHASH}): fit it on this model.",
        ),
        (
            ["--whiten-penalty", "1"],
            "error: bad option: Value error, whiten_penalty needs whiten: give --whiten PATH "
            "(a Gaussian file, or a folder of <hook>.safetensors) or --whiten auto",
        ),
        (
            ["--whiten-max-norm", "3"],
            "error: bad option: Value error, whiten_max_norm needs whiten: give --whiten PATH "
            "(a Gaussian file, or a folder of <hook>.safetensors) or --whiten auto",
        ),
        (
            ["--whiten", str(folder), "--whiten-penalty", "-1"],
            "error: bad option --whiten-penalty: Value error, whiten_penalty must be >= 0 "
            "(0: no penalty), got -1.0",
        ),
        (
            ["--whiten", str(folder), "--whiten-max-norm", "0"],
            "error: bad option --whiten-max-norm: Value error, whiten_max_norm must be > 0 "
            "(leave it unset for no cap), got 0.0",
        ),
        (
            ["--whiten", str(folder), "--hooks", HOOK2],
            f"error: --whiten {folder}: no {gaussian_file(folder, HOOK2)}: save one Gaussian "
            "per fitted hook there as <hook>.safetensors, or use --whiten auto.",
        ),
        (
            ["--whiten", str(folder), "--baseline", "lora"],
            "error: --whiten measures fitted vectors; a --baseline lora finetune has none: drop it",
        ),
    ]
    for extra, want in cases:
        assert one_line(runner.invoke(app, [*base, *extra])) == want
    assert not out.exists()
    with pytest.raises(ValueError, match="whiten is for basis 'residual'"):
        FitConfig(basis="sae", sae="x", whiten="auto")
