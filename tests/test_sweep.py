"""Layer x strength x readout sweeps: mechanics on a tiny chat model, outputs, errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from _chat_tiny import make_tiny_chat

from steerdiff.sweep import Cell, SweepConfig, SweepError, best_cell, run_sweep
from steerdiff.vectors import VectorSet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def chat(smollm):
    return make_tiny_chat(smollm.tokenizer)


def _small(**kw) -> SweepConfig:
    base = dict(
        layers=[0, 2],
        strengths=[0.0, 4.0],
        readouts=["last", "pca"],
        n_questions=2,
        n_contrast=3,
        n_neutral=2,
        kl_tokens=3,
        kl_bound=10.0,
        off_target_bound=1.0,
        confirm_questions=2,
    )
    return SweepConfig(**{**base, **kw})


def test_sweep_cells_and_outputs(chat, tmp_path):
    """Each cell's figures equal the full steered passes with that cell's own vector
    (readout, layer) and strength. Bug caught: a cell scored with another cell's vector
    (mutation tried: every cell uses the first layer's vector -> the layer-2 cells differ)."""
    from steerdiff.chat import read_lines_resource
    from steerdiff.evals import (
        CoherenceProbe,
        Steering,
        candidate_logprobs,
        load_category,
        question_prompts,
    )

    res = run_sweep(chat, _small(), progress=False)
    assert len(res.cells) == 2 * 2 * 2
    cat = load_category("animals")
    prompts = question_prompts(chat, cat.questions[:2], None)
    probe = CoherenceProbe(chat, read_lines_resource("neutral_prompts.txt")[:2], 3)
    base = torch.softmax(candidate_logprobs(chat, prompts, cat.candidates)[0], -1).mean(0)
    assert list(res.baseline["distribution"].values()) == pytest.approx(base.tolist(), abs=1e-5)
    owl = cat.candidates.index("owl")
    for c in res.cells:
        v = res.vectors[c.readout][c.hook]
        steering = Steering({c.hook: v}, coeff=c.strength)
        dist = torch.softmax(candidate_logprobs(chat, prompts, cat.candidates, steering)[0], -1)
        dist = dist.mean(0)
        gain = dist - base
        gain[owl] = -1.0
        others = dist.clone()
        others[owl] = -1.0
        assert c.target_rate == pytest.approx(float(dist[owl]), abs=1e-5)
        assert c.kl == pytest.approx(float(probe.kl(steering)[0]), abs=1e-5)
        assert c.off_target_gain == pytest.approx(float(gain.max()), abs=1e-5)
        assert c.off_target == cat.candidates[int(others.argmax())]
        assert c.vector_norm == pytest.approx(float(v.norm()), abs=1e-6)
        if c.strength == 0.0:  # no steering: same as unsteered, zero KL
            assert (c.kl, c.off_target_gain) == pytest.approx((0.0, 0.0), abs=1e-5)
    assert res.best == best_cell(res.cells, 1.0, 10.0)
    assert res.best_unbounded == max(res.cells, key=lambda c: c.target_rate)

    paths = res.write(tmp_path)
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == 8 and {"readout", "layer", "strength", "target_rate", "kl"} <= set(rows[0])
    data = json.loads(paths["json"].read_text())
    assert data["provenance"]["weights_hash"] == chat.weights_hash
    assert data["config"]["strengths"] == [0.0, 4.0] and len(data["cells"]) == 8
    for key in ("png_target_rate", "png_kl", "png_off_target_gain"):
        assert paths[key].read_bytes()[:4] == b"\x89PNG"
    vs = VectorSet.load(paths["vectors_pca"], chat)
    assert vs.metadata["readout"] == "pca" and list(vs) == [
        "blocks.0.hook_resid_post",
        "blocks.2.hook_resid_post",
    ]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def _cell(rate, gain, kl, layer=0):
    return Cell(
        "last", layer, f"blocks.{layer}.hook_resid_post", 1.0, rate, "cat", 0.1, gain, kl, 1.0
    )


def test_best_cell_respects_bounds():
    cells = [_cell(0.5, 0.3, 0.1, 1), _cell(0.4, 0.05, 2.0, 2), _cell(0.2, 0.05, 0.2, 3)]
    assert best_cell(cells, 0.10, 0.5).layer == 3
    assert best_cell(cells, None, None).layer == 1
    assert best_cell(cells, 0.10, None).layer == 2
    assert best_cell(cells, 0.01, 0.5) is None


def test_sweep_config_errors(chat):
    with pytest.raises(SweepError, match="strengths is empty"):
        run_sweep(chat, _small(strengths=[]), progress=False)
    with pytest.raises(SweepError, match="layers 0-2"):
        run_sweep(chat, _small(layers=[7]), progress=False)
    with pytest.raises(SweepError, match="not a candidate"):
        run_sweep(chat, _small(target="unicorn"), progress=False)


def test_cli_sweep_bad_input():
    from typer.testing import CliRunner

    from steerdiff.cli import app

    r = CliRunner().invoke(app, ["sweep", "--readouts", "last,middle"])
    assert r.exit_code == 2 and "Unknown readout" in r.output
    r = CliRunner().invoke(app, ["sweep", "--strengths", "1,two"])
    assert r.exit_code == 2 and "comma-separated numbers" in r.output


def test_cli_sweep_succeeds_and_equals_the_library(chat, monkeypatch, tmp_path):
    """README claim "a successful sweep" from the command line: readouts x layers x
    strengths cells, every output file, the same cells as run_sweep called directly, and
    the progress as plain lines when stderr is not a terminal (steerdiff.progress).
    Bugs caught: a CLI option not reaching SweepConfig (mutation tried: --questions
    ignored -> the baseline share differs), raw tqdm redraws in a log file (mutation
    tried: tqdm again -> no plain "sweep owl: 8/8 (100%)" line)."""
    from typer.testing import CliRunner

    import steerdiff.models as models
    from steerdiff.cli import app

    monkeypatch.setattr(models, "load_model", lambda spec, dtype, device: chat)
    out = tmp_path / "sweep"
    args = ["sweep", "--layers", "0,2", "--strengths", "0,4", "--readouts", "last,pca"]
    args += ["--questions", "2", "--confirm-questions", "3", "--kl-bound", "10"]
    args += ["--off-target-bound", "1", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    want = run_sweep(
        chat,
        SweepConfig(
            layers=[0, 2],
            strengths=[0.0, 4.0],
            readouts=["last", "pca"],
            n_questions=2,
            confirm_questions=3,
            kl_bound=10.0,
            off_target_bound=1.0,
        ),
        progress=False,
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "heatmap_kl.png",
        "heatmap_off_target_gain.png",
        "heatmap_target_rate.png",
        "sweep.csv",
        "sweep.json",
        "vectors_last.safetensors",
        "vectors_pca.safetensors",
    ]
    data = json.loads((out / "sweep.json").read_text())
    assert len(data["cells"]) == 2 * 2 * 2 == len(want.cells)
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["readout"], int(r["layer"]), float(r["strength"])) for r in rows] == [
        (r, la, s) for r in ("last", "pca") for la in (0, 2) for s in (0.0, 4.0)
    ]
    for got, c in zip(data["cells"], want.cells, strict=True):
        for key in ("target_rate", "off_target_gain", "kl", "vector_norm"):
            assert got[key] == pytest.approx(getattr(c, key), abs=1e-5), key
        assert got["off_target"] == c.off_target
    assert data["baseline"]["target_rate"] == pytest.approx(want.baseline["target_rate"], abs=1e-6)
    best = (data["best"]["readout"], data["best"]["layer"], data["best"]["strength"])
    assert best == (want.best.readout, want.best.layer, want.best.strength)
    assert data["confirm"]["n_questions"] == 3
    assert data["confirm"]["steered"]["target_rate"] == pytest.approx(
        want.confirm["steered"]["target_rate"], abs=1e-6
    )
    vs = VectorSet.load(out / "vectors_last.safetensors", chat)
    for hook, v in want.vectors["last"].items():
        assert torch.allclose(vs[hook], v, atol=1e-6)
    assert "8 cells in" in res.stdout and f"wrote {out}/" in res.stdout.replace("\n", "")
    assert "sweep owl: 8/8 (100%)" in res.stderr and "\r" not in res.stderr


@pytest.mark.parametrize("model", ["tiny", "smollm"])
def test_partial_forward_matches_full(chat, smollm_f32, model):
    """Replaying blocks L+1.. from the cached unsteered resid_post of block L (+ the vector)
    gives the same exact-scorer log-probs and KL as the full steered passes. In float32: in
    bfloat16 the replay scales the vector in float32 and the hook in bfloat16, and that
    1-ulp difference moves these log-probs by up to 0.25 nats (measured; the same in two
    full passes), which would hide a real replay bug."""
    smollm = smollm_f32
    import torch

    from steerdiff.chat import read_lines_resource
    from steerdiff.evals import (
        CoherenceProbe,
        FastCoherence,
        FastScorer,
        Steering,
        candidate_logprobs,
        load_category,
        question_prompts,
    )

    lm = chat if model == "tiny" else smollm
    n = lm.model.config.num_hidden_layers
    cat = load_category("animals")
    prompts = question_prompts(lm, cat.questions[:2], None)
    scorer = FastScorer(lm, prompts, cat.candidates)
    probe = CoherenceProbe(lm, read_lines_resource("neutral_prompts.txt")[:2], 3)
    coherence = FastCoherence(probe)
    d = lm.model.config.hidden_size
    v = torch.randn(d, generator=torch.Generator().manual_seed(0))
    v = v / v.norm() * 4.0
    coeffs = [0.0, 1.0, 3.0]
    for layer in sorted({0, n // 2, n - 1}):
        hook = f"blocks.{layer}.hook_resid_post"
        steering = Steering({hook: v}, coeff=coeffs)
        full = candidate_logprobs(lm, prompts, cat.candidates, steering)  # [G, Q, C]
        kls = probe.kl(steering)
        for g, c in enumerate(coeffs):
            fast = scorer.logprobs(layer, v, c)
            assert torch.allclose(fast, full[g], atol=1e-4, rtol=0), (layer, c)
            assert coherence.kl(layer, v, c) == pytest.approx(float(kls[g]), abs=1e-4)
    # per prompt (MELBO's coherence CI is over these): [coeff, prompt], each prompt's KL is
    # what a probe of that prompt alone measures (bug: the [G*K] rows regrouped the wrong
    # way, e.g. .view(K, G).T -> prompt 0 of coeff 1 reads another row), and their mean is kl
    per = probe.kl_per_prompt(steering)
    assert per.shape == (len(coeffs), 2)
    assert torch.allclose(per.mean(1), kls, atol=1e-6)
    alone = CoherenceProbe(lm, read_lines_resource("neutral_prompts.txt")[1:2], 3)
    assert torch.allclose(per[:, 1], alone.kl(steering), atol=1e-4)


def test_coherence_responses_match_generate_with_min_new_tokens(tiny_lm):
    """The probe's greedy responses (generate.sample) are model.generate's with
    min_new_tokens=n: exactly n tokens, the end-of-sequence token never chosen."""
    import torch

    from steerdiff.evals.scoring import greedy_responses
    from steerdiff.generate import sample

    m = tiny_lm.model
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    free = sample(tiny_lm, prompts, 6, temperature=0.0, stop_ids=[])
    m.generation_config.eos_token_id = free[0].token_ids[2]  # greedy would pick it at step 3
    want = []
    for p in prompts:
        ids = torch.tensor([p])
        out = m.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=6,
            min_new_tokens=6,
            pad_token_id=0,
        )
        want.append(out[0, len(p) :].tolist())
    got = greedy_responses(tiny_lm, prompts, 6)
    assert got == want and all(len(r) == 6 for r in got)
    assert got[0] != free[0].token_ids
