"""Similarity: cosine matrices per hook, set vs contrast per layer, correlation of effects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _read_helpers import ByteTok

from steerdiff.interpret import pairwise_mean_cosine, planted_check
from steerdiff.interpret.similarity import (
    cosine_matrices,
    cross_cosine,
    effect_correlation,
    effect_vectors,
)
from steerdiff.vectors import VectorSet, VectorSetError


def _set(seed: int, hooks=("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")) -> VectorSet:
    g = torch.Generator().manual_seed(seed)
    return VectorSet({h: torch.randn(64, generator=g) for h in hooks})


def test_cosine_matrices_between_sets():
    a, b = _set(0), _set(1)
    mats = cosine_matrices({"a": a, "b": b, "neg_a": -a, "2a": a * 2.0})
    m = mats["blocks.0.hook_resid_post"]
    assert m.values.shape == (4, 4)
    assert torch.allclose(m.values.diagonal(), torch.ones(4), atol=1e-6)
    assert m.values[0, 2] == pytest.approx(-1.0, abs=1e-6)
    assert m.values[0, 3] == pytest.approx(1.0, abs=1e-6)
    want = torch.nn.functional.cosine_similarity(
        a["blocks.0.hook_resid_post"], b["blocks.0.hook_resid_post"], dim=0
    )
    assert m.values[0, 1] == pytest.approx(float(want), abs=1e-6)
    assert "a" in m.to_csv().splitlines()[1]


def test_cross_cosine_fitted_vs_contrast_per_layer():
    fitted = _set(0, ("blocks.1.hook_resid_post", "blocks.1.attn.hook_q"))
    fitted.vectors["blocks.1.attn.hook_q"] = torch.randn(32)
    contrast = {f"blocks.{i}.hook_resid_post": torch.randn(64) for i in range(3)}
    contrast["blocks.1.hook_resid_post"] = fitted["blocks.1.hook_resid_post"] * 3
    m = cross_cosine(fitted, contrast)
    assert m.values.shape == (2, 3)
    assert m.values[0, 1] == pytest.approx(1.0, abs=1e-6)
    assert torch.isnan(m.values[1]).all()  # q vector (width 32) vs residual: not comparable
    one = cross_cosine(fitted, contrast["blocks.0.hook_resid_post"])
    assert one.cols == ["vector"]
    with pytest.raises(VectorSetError, match="same width"):
        cross_cosine({"q": torch.randn(32)}, {"r": torch.randn(64)})


def test_effect_correlation_values():
    """Bug caught: a correlation that is not Pearson's (uncentred, or a cosine)."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(500, generator=g)
    effects = {"e": e, "affine": 2 * e + 3, "neg": -e, "other": torch.randn(500, generator=g)}
    m = effect_correlation(effects)
    assert m.values[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert m.values[0, 2] == pytest.approx(-1.0, abs=1e-5)
    # an unrelated effect: exactly numpy's Pearson r (about 0, not just "small")
    want = np.corrcoef(e.numpy(), effects["other"].numpy())[0, 1]
    assert float(m.values[0, 3]) == pytest.approx(float(want), abs=1e-5)
    assert m.values[3, 0] == m.values[0, 3]


def test_bad_inputs():
    with pytest.raises(VectorSetError, match="at least two"):
        cosine_matrices({"a": _set(0)})
    with pytest.raises(VectorSetError, match="share no hook"):
        cosine_matrices(
            {
                "a": _set(0, ("blocks.0.hook_resid_post",)),
                "b": _set(1, ("blocks.1.hook_resid_post",)),
            }
        )
    with pytest.raises(ValueError, match="different shapes"):
        effect_correlation({"a": torch.randn(10), "b": torch.randn(11)})


def test_effects_of_vectors_at_different_hooks(tiny_lm):
    """A vector and the same vector at the next hook (resid_post l == resid_pre l+1) have
    identical effects; a q bias can be compared by effect although not by cosine."""
    tiny_lm.tokenizer = ByteTok()
    d = tiny_lm.model.config.hidden_size
    v = torch.randn(d, generator=torch.Generator().manual_seed(2))
    sets = {
        "post0": VectorSet.for_model(tiny_lm, {"blocks.0.hook_resid_post": v}),
        "pre1": VectorSet.for_model(tiny_lm, {"blocks.1.hook_resid_pre": v}),
        "q1": VectorSet.for_model(tiny_lm, {"blocks.1.attn.hook_q": torch.randn(64)}),
    }
    texts = ["hello there world", "owls hoot at night", "numbers 123 456"]
    eff = effect_vectors(tiny_lm, sets, texts, first_k=1, max_tokens=16)
    m = effect_correlation(eff)
    assert m.values[0, 1] == pytest.approx(1.0, abs=1e-4)
    assert m.values.shape == (3, 3) and not torch.isnan(m.values).any()


def test_pairwise_mean_cosine_averages_shared_hooks_only():
    """Bug caught: averaging over hooks one set lacks, or pairing a set with itself."""
    a, b = _set(0), _set(1)
    only_0 = VectorSet({"blocks.0.hook_resid_post": -a["blocks.0.hook_resid_post"]})
    elsewhere = _set(2, ("blocks.5.hook_resid_post",))
    got = pairwise_mean_cosine({"a": a, "b": b, "neg0": only_0, "far": elsewhere})
    cos = [
        float(torch.nn.functional.cosine_similarity(a[h], b[h], dim=0))
        for h in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    ]
    assert got["a vs b"] == pytest.approx(sum(cos) / 2, abs=1e-6)
    assert got["a vs neg0"] == pytest.approx(-1.0, abs=1e-6)  # only the shared hook counts
    assert not any("far" in k for k in got)  # no shared hook: no entry
    assert set(got) == {"a vs b", "a vs neg0", "b vs neg0"}


def test_planted_check_finds_the_planted_vector(tiny_lm):
    """Bug caught: a check that compares the wrong hook or normalises the norm ratio away."""
    hook = "blocks.2.hook_resid_post"
    v_star = torch.randn(64, generator=torch.Generator().manual_seed(0))
    fitted = {
        "same": VectorSet({hook: v_star * 0.5}),
        "opposite": VectorSet({hook: -v_star}),
        "other-hook": VectorSet({"blocks.1.hook_resid_post": v_star}),
    }
    rows = {r["fit"]: r for r in planted_check(tiny_lm, hook, v_star, fitted, k=10)}
    assert set(rows) == {"same", "opposite"}  # a set without the hook is skipped
    assert rows["same"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rows["same"]["norm_ratio"] == pytest.approx(0.5, abs=1e-6)
    assert rows["same"]["dla_top10_overlap_centred"] == 10
    assert rows["opposite"]["cosine"] == pytest.approx(-1.0, abs=1e-6)
    # -v*'s top tokens are v*'s bottom ones: none in common with v*'s top 10 (vocab 256)
    assert rows["opposite"]["dla_top10_overlap_raw"] == 0
    assert rows["opposite"]["dla_top10_overlap_centred"] == 0


def test_cli_read_similarity_tables_and_effects(tmp_path):
    """Bug caught: `steerdiff read similarity` (a README command) labelling sets wrongly,
    writing tables that are not the cosines, or effects that are not the correlation of the
    sets' logit effects (a vector at blocks.0 resid_post and the same at blocks.1 resid_pre
    act identically: r = 1)."""
    import json

    from _read_helpers import tiny_model_folder
    from typer.testing import CliRunner

    from steerdiff.cli import app

    g = torch.Generator().manual_seed(0)
    v, w, u = (torch.randn(64, generator=g) for _ in range(3))
    p0, p1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
    a = VectorSet({p0: v, p1: w}).save(tmp_path / "a.safetensors")
    b = VectorSet({p0: -2 * v, p1: w + u}).save(tmp_path / "b.safetensors")
    c = VectorSet({p0: u, p1: 3 * w}).save(tmp_path / "contrast.safetensors")
    out = tmp_path / "o"
    r = CliRunner().invoke(
        app,
        ["read", "similarity", f"seed0={a}", str(b), "--contrast", str(c), "--out", str(out)],
    )
    assert r.exit_code == 0, r.output
    assert "cosine: 2 table(s) contrast: 2 table(s)" in " ".join(r.stdout.split())
    rep = json.loads((out / "similarity.json").read_text())
    assert set(rep) == {"cosine", "contrast"}
    m0, m1 = rep["cosine"][p0], rep["cosine"][p1]
    assert m0["rows"] == m0["cols"] == ["seed0", "b"]  # label=path, or the file's stem
    np.testing.assert_allclose(m0["values"], [[1, -1], [-1, 1]], atol=1e-6)
    cos_wu = float(torch.nn.functional.cosine_similarity(w, w + u, dim=0))
    np.testing.assert_allclose(m1["values"], [[1, cos_wu], [cos_wu, 1]], atol=1e-6)
    cv = rep["contrast"]["seed0"]
    assert cv["rows"] == [p0, p1] and cv["cols"] == [p0, p1]
    cos_vu = float(torch.nn.functional.cosine_similarity(v, u, dim=0))
    assert cv["values"][0][0] == pytest.approx(cos_vu, abs=1e-6)
    assert cv["values"][1][1] == pytest.approx(1.0, abs=1e-6)
    csv = (out / f"cosine_{p0}.csv").read_text().splitlines()
    assert csv == [",seed0,b", "seed0,1.0000,-1.0000", "b,-1.0000,1.0000"]
    assert (out / f"cosine_{p1}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "contrast_b.csv").exists()
    # effects on a tiny model: the same vector on either side of block 1's input
    folder = tiny_model_folder(tmp_path / "m")
    (tmp_path / "texts.txt").write_text("the owl sat\nnumbers 1 2 3\nplain text here\n")
    post = VectorSet({p0: v}).save(tmp_path / "post.safetensors")
    pre = VectorSet({"blocks.1.hook_resid_pre": v}).save(tmp_path / "pre.safetensors")
    far = VectorSet({"blocks.2.hook_resid_pre": u}).save(tmp_path / "far.safetensors")
    args = ["read", "similarity", str(post), str(pre), str(far), "--effects"]
    args += ["--model", str(folder), "--corpus", str(tmp_path / "texts.txt"), "--n", "3"]
    r = CliRunner().invoke(app, [*args, "--tokens", "8", "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "e" / "similarity.json").read_text())
    said = " ".join(r.stdout.split())  # rich wraps long lines
    assert "no per-hook cosine: The vector sets share no hook points" in said
    assert "effects: 1 table(s)" in said and "cosine" not in rep
    eff = rep["effects"]
    assert eff["rows"] == ["post", "pre", "far"]
    assert eff["values"][0][1] == pytest.approx(1.0, abs=1e-5)
    assert abs(eff["values"][0][2]) < 0.9  # a different vector: not the same effect
