"""MELBO (steerdiff.melbo): orthogonal vectors of norm R, an objective that rises, the
radius sweep, resuming, planted recovery, and the CLI's one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from steerdiff.cli import app
from steerdiff.melbo import MelboConfig, MelboError, TargetMap, train_melbo
from steerdiff.melbo.evals import planted_recovery
from steerdiff.melbo.run import run_melbo
from steerdiff.melbo.sweep import radius_sweep
from steerdiff.replay import hook_activations
from steerdiff.whiten import gaussian_from_activations

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SRC, TGT = "blocks.0.hook_resid_post", "blocks.2.hook_resid_post"


def _prompts(n: int = 4, length: int = 12, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 250, (n, length), generator=g).tolist()


def _cfg(**kw) -> MelboConfig:
    base = dict(source_hook=SRC, target_hook=TGT, n_vectors=3, radius=2.0, steps=25, lr=0.05)
    return MelboConfig(**{**base, **kw})


def test_vectors_orthogonal_and_of_norm_r(tiny_lm):
    """Bug: a vector not projected off the earlier ones (or not renormalised after the Adam
    step) drifts off orthogonality / off the sphere."""
    res = train_melbo(tiny_lm, _cfg(), _prompts(), progress=False)
    V = res.vectors.double()
    assert V.shape == (3, 64)
    torch.testing.assert_close(
        V.norm(dim=1), torch.full((3,), 2.0, dtype=V.dtype), rtol=0, atol=1e-5
    )
    cos = (V @ V.T) / (V.norm(dim=1)[:, None] * V.norm(dim=1)[None])
    off = cos - torch.eye(3, dtype=V.dtype)
    assert off.abs().max() < 1e-5, cos


def test_whitened_norm_and_orthogonality(tiny_lm):
    """Bug: the whitened sphere built from the wrong factor (cov instead of its Cholesky
    factor, or L^T for L) gives vectors whose Mahalanobis norm is not R."""
    x = torch.tensor(_prompts(16, 16, seed=3))
    acts = hook_activations(tiny_lm, [SRC], x)[SRC]
    g = gaussian_from_activations(acts, SRC)
    res = train_melbo(tiny_lm, _cfg(norm="whitened"), _prompts(), progress=False, gaussian=g)
    V = res.vectors.double()
    torch.testing.assert_close(
        g.mahalanobis_norm(V), torch.full((3,), 2.0, dtype=torch.float64), rtol=1e-5, atol=0
    )
    M = V @ torch.cholesky_solve(V.T, torch.linalg.cholesky(g.cov))  # theta_i^T cov^-1 theta_j
    off = M / 4.0 - torch.eye(3, dtype=M.dtype)
    assert off.abs().max() < 1e-5, M
    # and not merely an L2 sphere: the Euclidean norms differ from R
    assert (V.norm(dim=1) - 2.0).abs().min() > 1e-2


def test_objective_increases(tiny_lm):
    """Bug: the gradient sign flipped (descent), or no renormalisation (the vector grows off
    the sphere): the objective must rise by a clear margin for every vector, with the
    vector still of norm R."""
    res = train_melbo(tiny_lm, _cfg(), _prompts(), progress=False)
    for c in res.curves:
        assert len(c) == 26
        assert c[-1] > 1.1 * c[0], c
    # the recorded last value is the objective of the saved vector
    tmap = TargetMap(tiny_lm, SRC, TGT, _prompts())
    for i, c in enumerate(res.curves):
        got = tmap.stats(res.vectors[i], 2.0, 2.0)["objective"]
        assert got == pytest.approx(c[-1], rel=1e-4)


def test_objective_is_the_published_formula(tiny_lm):
    """Bug: padding counted in the objective, the power / root swapped, or skip_first not
    applied: sum over prompts of (sum over positions ||dZ||^p)^(1/q), computed here by hand on
    unpadded prompts with full forwards, over every position (skip_first=0, as published)
    and without the first (skip_first=1, the default)."""
    from steerdiff.hooks import record, steer

    prompts = [p[:n] for p, n in zip(_prompts(3, 12), (12, 7, 4), strict=True)]
    theta = torch.randn(64, generator=torch.Generator().manual_seed(1))
    want = {0: 0.0, 1: 0.0}
    for p in prompts:
        x = torch.tensor([p])
        with record(tiny_lm.model, [TGT]) as r0:
            tiny_lm.model(x)
        with steer(tiny_lm.model, {SRC: theta}), record(tiny_lm.model, [TGT]) as r1:
            tiny_lm.model(x)
        dn = (r1[TGT] - r0[TGT])[0].norm(dim=-1)
        for k in want:
            want[k] += float(dn[k:].pow(3.0).sum() ** (1 / 1.5))
    for k in want:
        tmap = TargetMap(tiny_lm, SRC, TGT, prompts, batch_size=3, skip_first=k)
        assert tmap.stats(theta, 3.0, 1.5)["objective"] == pytest.approx(want[k], rel=1e-4)
    assert want[0] > want[1] * 1.01  # the first position does count when kept


def test_radius_sweep_change_grows_with_r(tiny_lm):
    """Bug: the radius not applied (every R trains / draws the same vector), or the random
    baseline drawn at another norm: the change must grow with R, and a trained vector
    changes the target at least as much as random ones of its norm."""
    rows = radius_sweep(
        tiny_lm, _cfg(steps=10, n_random=3), [0.25, 1.0, 4.0], _prompts(), progress=False
    )
    tr = [r["trained_change"] for r in rows]
    rd = [r["random_change"] for r in rows]
    assert tr[0] < tr[1] < tr[2] and rd[0] < rd[1] < rd[2]
    assert tr[2] > 4 * tr[0]
    assert all(r["trained_change"] >= r["random_change"] for r in rows)


def test_resume_skips_finished_vectors(tiny_lm, tmp_path, monkeypatch):
    """Bug: a rerun retrains the vectors already saved (changing them, or wasting the time) or
    trains vectors that are not orthogonal to the loaded ones; other settings must not be
    mixed in silently."""
    import steerdiff.melbo.train as train

    train_melbo(tiny_lm, _cfg(n_vectors=2), _prompts(), progress=False, out=tmp_path)
    files = sorted(tmp_path.glob("vector_*.safetensors"))
    before = [f.read_bytes() for f in files]
    calls = []
    real = train.train_vector
    monkeypatch.setattr(train, "train_vector", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = train_melbo(tiny_lm, _cfg(n_vectors=3), _prompts(), progress=False, out=tmp_path)
    assert len(calls) == 1  # vector 2 only
    assert [f.read_bytes() for f in files] == before
    assert (tmp_path / "vector_02.safetensors").exists()
    V = res.vectors.double()
    assert (V[2] @ V[:2].T).abs().max() / 4.0 < 1e-5
    fewer = train_melbo(tiny_lm, _cfg(n_vectors=2), _prompts(), progress=False, out=tmp_path)
    assert len(calls) == 1 and fewer.vectors.shape == (2, 64)  # the first 2, not all 3
    torch.testing.assert_close(fewer.vectors, res.vectors[:2], rtol=0, atol=0)
    with pytest.raises(MelboError, match="other settings"):
        train_melbo(
            tiny_lm, _cfg(n_vectors=3, radius=3.0), _prompts(), progress=False, out=tmp_path
        )


def test_target_before_source_is_one_line(tiny_lm):
    """Bug: a target in the source's block or before it trains on a zero change (nothing)."""
    with pytest.raises(MelboError, match="not in a later block"):
        TargetMap(tiny_lm, TGT, SRC, _prompts())


def test_planted_recovery_finds_the_planted_direction():
    """Bug: cosines not normalised, or the chance level computed for the wrong width: a
    planted direction among random ones is recovered (|cos| 1), a random one is not."""
    g = torch.Generator().manual_seed(0)
    V = torch.linalg.qr(torch.randn(64, 4, generator=g)).Q.T * 3.0  # 4 orthogonal, norm 3
    hit = planted_recovery(V, V[2] * 5.0, n_random=300)
    assert hit["best_vector"] == 2 and hit["best_cos"] == pytest.approx(1.0, abs=1e-9)
    assert hit["span_fraction"] == pytest.approx(1.0, abs=1e-9) and hit["above_chance"]
    miss = planted_recovery(V, torch.randn(64, generator=g), n_random=300)
    assert not miss["above_chance"]
    assert miss["chance_one_vector"] == pytest.approx(1 / 8)
    assert 0.1 < miss["chance_best_cos_mean"] < 0.35  # best of 4 random |cos| in d=64


def _cli(*args: str):
    return CliRunner().invoke(app, ["melbo", *args])


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--radius", "0"], "radius must be > 0"),
        (["--radius", "-2"], "radius must be > 0"),
        (["--radii", "1,0"], "every radius must be > 0"),
        (["--evals", "preference,vibes"], "unknown eval 'vibes'"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, args, needle):
    """Bug: R <= 0 or an unknown eval name reaching training (a traceback, or a silent run):
    one line `error: ...`, exit 2, nothing written."""
    r = _cli("--out", str(tmp_path / "o"), *args)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    if "eval" in needle:
        assert "preference, misalignment, coherence" in lines[0]
    assert not (tmp_path / "o").exists()


def test_run_melbo_writes_and_resumes(tiny_lm, tmp_path, monkeypatch):
    """Bug: melbo.json missing a part (training curves, sweep, planted recovery), or a rerun
    retraining the vectors / redoing the sweep: the second run trains and sweeps nothing and
    leaves the vector files and the sweep as they were."""
    import steerdiff.melbo.run as run
    import steerdiff.melbo.train as train

    cfg = _cfg(n_vectors=2, steps=5, radii=[0.5, 2.0], n_random=2, n_samples=0)
    planted = torch.randn(64, generator=torch.Generator().manual_seed(5))
    doc = run_melbo(tiny_lm, cfg, tmp_path, planted=planted, prompts=_prompts(), progress=False)
    on_disk = json.loads((tmp_path / "melbo.json").read_text())
    assert on_disk["training"]["n_vectors"] == 2 and len(on_disk["training"]["curves"]) == 2
    assert [r["radius"] for r in on_disk["sweep"]] == [0.5, 2.0]
    assert len(on_disk["planted"]["cos"]) == 2
    assert on_disk["provenance"]["config"]["radius"] == 2.0
    assert (tmp_path / "melbo.png").read_bytes()[:4] == b"\x89PNG"
    files = {f.name: f.read_bytes() for f in tmp_path.glob("vector_*.safetensors")}
    assert sorted(files) == ["vector_00.safetensors", "vector_01.safetensors"]
    calls = []
    monkeypatch.setattr(train, "train_vector", lambda *a, **k: calls.append("train"))
    monkeypatch.setattr(run, "radius_sweep", lambda *a, **k: calls.append("sweep"))
    doc2 = run_melbo(tiny_lm, cfg, tmp_path, planted=planted, prompts=_prompts(), progress=False)
    assert calls == []
    assert {f.name: f.read_bytes() for f in tmp_path.glob("vector_*.safetensors")} == files
    assert doc2["sweep"] == doc["sweep"] and doc2["training"] == doc["training"]


def test_pipeline_stage_writes_melbo_and_reports(tmp_path, smollm):
    """[melbo] in an experiment file: the stage's folder holds the vectors and melbo.json (the
    evals and a sample per vector), the report has the section with its table, and a rerun
    is cached (bugs: the stage not run / not wired to the report, the evals missing)."""
    from _pipeline_tiny import save_tiny

    from steerdiff.pipeline import parse_config, run_experiment

    model = save_tiny(tmp_path / "tiny", smollm, "llama", 3)
    data = tmp_path / "d.jsonl"
    row = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    }
    data.write_text((json.dumps(row) + "\n") * 4)
    melbo = dict(
        source_hook="blocks.0.hook_resid_post", target_hook="blocks.2.hook_resid_post",
        n_vectors=2, radius=2.0, steps=3, n_prompts=2, max_tokens=24, evals=["preference",
        "coherence"], n_questions=2, n_samples=1, sample_tokens=4,
    )  # fmt: skip
    raw = {
        "name": "melbo-tiny",
        "model": str(model),
        "dtype": "float32",
        "task": {"name": "dataset", "data": str(data)},
        "read": {"lens_texts": 0},
        "melbo": melbo,
    }
    summary = run_experiment(parse_config(raw, source="melbo (tiny)"), tmp_path / "runs")
    st = summary.stages["melbo"]
    doc = json.loads((st.path / "melbo.json").read_text())
    assert sorted(p.name for p in st.path.glob("vector_*.safetensors")) == [
        "vector_00.safetensors",
        "vector_01.safetensors",
    ]
    assert [v["vector"] for v in doc["evals"]["vectors"]] == [0, 1]
    assert sorted(doc["evals"]["ranking"]) == [0, 1]
    for v in doc["evals"]["vectors"]:
        assert set(v["preference"]) >= {"target_rate", "shift", "shift_ci95"}
        assert v["coherence_kl"] >= 0 and len(v["samples"]) == 1
    page = (summary.run_dir / "report.html").read_text()
    assert "MELBO: unsupervised steering vectors" in page and "trait shift (95% CI)" in page
    again = run_experiment(parse_config(raw, source="melbo (tiny)"), tmp_path / "runs")
    assert again.stages["melbo"].cached
