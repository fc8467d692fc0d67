"""Whitened steering strength (issue 16, item 1): whitened_units, sweeps and teachers in
whitened units, `eval preference --units whitened`, `steerdiff whiten fit | norm`, and the
[whiten] pipeline stage. Tiny random models: the mechanics are real, the figures meaningless."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _chat_tiny import make_tiny_chat
from _pipeline_tiny import save_tiny
from typer.testing import CliRunner

from steerdiff.cli import app
from steerdiff.hooks import record
from steerdiff.models import load_model
from steerdiff.vectors import VectorSet
from steerdiff.whiten import (
    Gaussian,
    WhitenError,
    fit_gaussian,
    gaussian_from_activations,
    vector_figures,
    whitened_units,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HOOK = "blocks.1.hook_resid_post"


def gaussian(hook: str, d: int, seed: int, scale: float = 1.0) -> Gaussian:
    """A Gaussian of correlated random activations [600, d] (each seed another covariance)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    x = scale * torch.randn(600, d, generator=g, dtype=torch.float64) @ mix + 1.0
    return gaussian_from_activations(x, hook, shrinkage="none")


def one_line_error(r, *needles: str) -> None:
    """Exit 2 and one `error: ...` line on stdout (stderr may hold the loading bars)."""
    out = r.stdout.strip()
    assert r.exit_code == 2, r.output
    assert out.startswith("error: ") and "\n" not in out and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in out, out


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny2", smollm, "llama", 2)


def test_whitened_units_are_one_mahalanobis_unit_along_the_same_direction():
    """Bugs caught: the vector not rescaled, or rescaled by its L2 norm (mutation tried:
    `whitened_coeff(g, v, 1.0)` -> `1 / v.norm()`: the norm is not 1), one hook's Gaussian
    used for another's vector (both hooks checked), and a missing Gaussian passing silently."""
    gs = {"a": gaussian("a", 8, 0), "b": gaussian("b", 8, 1, scale=3.0)}
    gen = torch.Generator().manual_seed(2)
    vs = {h: torch.randn(8, generator=gen, dtype=torch.float64) for h in gs}
    out = whitened_units(vs, gs)
    for h, v in vs.items():
        assert float(gs[h].mahalanobis_norm(out[h])) == pytest.approx(1.0, abs=1e-9)
        cos = torch.nn.functional.cosine_similarity(out[h], v, dim=0)
        assert float(cos) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(WhitenError, match=r"No Gaussian for c \(have: a, b\)"):
        whitened_units({"c": vs["a"]}, gs)
    with pytest.raises(WhitenError, match="The Gaussian given for a was fitted at b"):
        whitened_units({"a": vs["a"]}, {"a": gs["b"]})


def test_sweep_in_whitened_units_scales_each_layer_by_its_own_gaussian(smollm):
    """Each cell's owl share and KL equal a full steered pass with the RAW vector x
    strength / ||v||_M under that layer's own Gaussian, and the cell records ||v||_M and that
    coefficient. Bugs caught: the strength applied to the raw vector (mutation tried:
    sweep_vectors returns the raw sets for "whitened" -> target/KL of layer 2 differ), and one
    layer's Gaussian used for every layer (mutation tried: gaussians[hooks[0]] -> the
    layer-2 norm differs)."""
    from steerdiff.chat import read_lines_resource
    from steerdiff.evals import (
        CoherenceProbe,
        Steering,
        candidate_logprobs,
        load_category,
        question_prompts,
    )
    from steerdiff.sweep import SweepConfig, run_sweep

    chat = make_tiny_chat(smollm.tokenizer)
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    gs = {hooks[0]: gaussian(hooks[0], 64, 3), hooks[1]: gaussian(hooks[1], 64, 4, scale=5.0)}
    cfg = SweepConfig(
        layers=[0, 2],
        strengths=[2.0],
        readouts=["last"],
        n_questions=2,
        n_contrast=3,
        n_neutral=2,
        kl_tokens=3,
        confirm_questions=0,
        units="whitened",
    )
    res = run_sweep(chat, cfg, progress=False, gaussians=gs)
    assert json.loads(json.dumps(res.to_dict()))["config"]["units"] == "whitened"
    cat = load_category("animals")
    prompts = question_prompts(chat, cat.questions[:2], None)
    probe = CoherenceProbe(chat, read_lines_resource("neutral_prompts.txt")[:2], 3)
    owl = cat.candidates.index("owl")
    assert len(res.cells) == 2
    for c in res.cells:
        v = res.vectors["last"][c.hook]  # the raw (L2) vector
        m = float(gs[c.hook].mahalanobis_norm(v))
        assert c.mahalanobis_norm == pytest.approx(m, rel=1e-9)
        assert c.l2_coeff == pytest.approx(2.0 / m, rel=1e-9)
        steering = Steering({c.hook: v}, coeff=2.0 / m)
        dist = torch.softmax(candidate_logprobs(chat, prompts, cat.candidates, steering)[0], -1)
        assert c.target_rate == pytest.approx(float(dist.mean(0)[owl]), abs=1e-5)
        assert c.kl == pytest.approx(float(probe.kl(steering)[0]), abs=1e-5)
        assert c.kl > 1e-4  # the steering did something (else the checks above are empty)


def test_teacher_in_whitened_units_adds_c_data_standard_deviations(tiny_lm, tmp_path):
    """The activation a whitened steered teacher writes with differs from the unsteered one
    by exactly coeff x v / ||v||_M; its spec records the scale, and a rebuild from the spec
    (a dataset manifest) without the Gaussian steers the same. Bugs caught: the coeff applied
    to the raw vector (mutation tried: whitened_teacher_vectors returns `vectors` -> the
    difference is coeff x v), the scale not recorded (rebuild fails), and a Gaussian of
    another hook accepted (one-line TeacherError)."""
    from pydantic import ValidationError

    from steerdiff.teachers import TeacherConfig, TeacherError, build_teacher

    d = tiny_lm.model.config.hidden_size
    g = gaussian(HOOK, d, 5, scale=0.5)
    path = g.save(tmp_path / "g.safetensors")
    v = torch.randn(d, generator=torch.Generator().manual_seed(6))
    vs = VectorSet({HOOK: v})
    cfg = TeacherConfig(
        kind="steered", hook=HOOK, coeff=3.0, coeff_units="whitened", whiten=str(path)
    )
    teacher = build_teacher(cfg, tiny_lm, vectors=vs)
    ids = torch.tensor([[1, 5, 9, 2, 7]])

    def acts(t) -> torch.Tensor:
        with t.generating(), record(tiny_lm.model, [HOOK]) as rec:
            tiny_lm.model(ids)
        return rec[HOOK][0].double()

    with record(tiny_lm.model, [HOOK]) as rec:
        tiny_lm.model(ids)
    base = rec[HOOK][0].double()
    want = 3.0 * v.double() / float(g.mahalanobis_norm(v))
    torch.testing.assert_close(acts(teacher) - base, want.expand_as(base), atol=1e-5, rtol=1e-5)
    spec = teacher.spec()
    assert spec["coeff_units"] == "whitened" and spec["coeff"] == 3.0
    assert spec["whitened_scale"][HOOK] == pytest.approx(
        1 / float(g.mahalanobis_norm(v)), rel=1e-12
    )
    again = build_teacher({**spec, "whiten": None}, tiny_lm, vectors=vs)
    torch.testing.assert_close(acts(again) - base, want.expand_as(base), atol=1e-5, rtol=1e-5)

    other = gaussian("blocks.0.hook_resid_post", d, 7).save(tmp_path / "other.safetensors")
    with pytest.raises(TeacherError, match="fitted at blocks.0.hook_resid_post, not " + HOOK):
        build_teacher(cfg.model_copy(update={"whiten": str(other)}), tiny_lm, vectors=vs)
    with pytest.raises(TeacherError, match="need a Gaussian"):  # none given, no texts
        build_teacher(cfg.model_copy(update={"whiten": None}), tiny_lm, vectors=vs)
    with pytest.raises(ValidationError, match="for steered / sae teachers"):
        TeacherConfig(kind="prompt", coeff_units="whitened")


def test_cli_eval_whitened_needs_a_gaussian_of_the_vectors_hook(tiny_folder, tmp_path):
    """`eval preference --units whitened --whiten G` with G fitted at another hook: one line,
    exit 2, before any scoring (the acceptance item's bad input), naming both hooks. Bugs
    caught: the Gaussian not checked against the vectors' hook and model (mutation tried:
    check_for skipped in whiten.resolve_gaussians -> only whitened_units' later hook check stops
    it, with a message that no longer says "fitted at X, not Y": fails), and a bad --units
    value passing."""
    vec = VectorSet({HOOK: torch.randn(32)}).save(tmp_path / "v.safetensors")
    other = gaussian("blocks.0.hook_resid_post", 32, 8).save(tmp_path / "g0.safetensors")
    base = ["eval", "preference", "--model", str(tiny_folder), "--vectors", str(vec)]
    r = CliRunner().invoke(app, [*base, "--units", "whitened", "--whiten", str(other)])
    one_line_error(r, "fitted at blocks.0.hook_resid_post, not " + HOOK)
    r = CliRunner().invoke(app, [*base, "--units", "mahalanobis"])
    one_line_error(r, "--units must be l2 or whitened")
    one_line_error(CliRunner().invoke(app, ["sweep", "--units", "sd"]), "--units must be l2 or")
    # generate: whitened units are for teachers that add a vector (bug: silently ignored)
    gen = ["generate", "--teacher", "prompt", "--out", str(tmp_path / "data"), "--n-prompts", "1"]
    r = CliRunner().invoke(app, [*gen, "--coeff-units", "whitened"])
    one_line_error(r, "--coeff-units whitened is for --teacher steered or sae, not prompt")
    assert not (tmp_path / "data").exists()


def test_cli_eval_in_whitened_units_is_the_l2_eval_at_c_over_the_mahalanobis_norm(
    tiny_folder, tmp_path
):
    """`eval preference --vectors V --coeff c --units whitened --whiten G` scores exactly what
    `--coeff c / ||v||_M` in L2 units scores (a change of units is a rescaling of the
    coefficient). Bugs caught: --units whitened ignored on the happy path (mutation tried:
    `steering_in_units` returns its input -> the whitened share equals the coeff-c L2 share,
    not the rescaled one), the coefficient divided instead of multiplied or the L2 norm used."""
    lm = load_model(str(tiny_folder), dtype="float32")
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(lm.model.config.hidden_size, generator=gen) * 3.0
    vec = VectorSet({HOOK: v}).save(tmp_path / "v.safetensors")
    g = gaussian(HOOK, v.numel(), 3, scale=2.0)
    g.meta["weights_hash"] = lm.weights_hash
    gf = g.save(tmp_path / "g.safetensors")
    c = 6.0
    k = c / float(g.mahalanobis_norm(v.double()))
    base = ["eval", "preference", "--model", str(tiny_folder), "--vectors", str(vec)]
    base += ["--n-questions", "4", "--dtype", "float32"]

    def share(*extra: str, name: str) -> float:
        out = tmp_path / f"{name}.json"
        r = CliRunner().invoke(app, [*base, *extra, "--out", str(out)])
        assert r.exit_code == 0, r.output
        return json.loads(out.read_text())["target_rate"]

    whitened = share("--coeff", str(c), "--units", "whitened", "--whiten", str(gf), name="w")
    rescaled = share("--coeff", repr(k), name="l2k")
    plain = share("--coeff", str(c), name="l2c")
    assert whitened == pytest.approx(rescaled, rel=1e-5, abs=1e-9)
    assert abs(whitened - plain) > 1e-4  # k != c here, so the units made a difference


def test_cli_whiten_fit_and_norm_equal_the_library(tiny_folder, tmp_path):
    """`whiten fit` saves the Gaussian fit_gaussian makes on the same corpus texts, refuses
    to overwrite; `whiten norm` writes vector_figures' numbers; a Gaussian of another hook or
    of another model is one line, exit 2. Bugs caught: fit on other texts / tokens (mutation
    tried: max_tokens not passed -> the mean differs), an --out overwritten without
    --overwrite, norm figures of another vector, the model (weights hash) not compared."""
    from steerdiff.interpret.corpus import load_corpus

    out = tmp_path / "g.safetensors"
    args = ["whiten", "fit", "--model", str(tiny_folder), "--hook", HOOK, "--texts", "6"]
    args += ["--max-tokens", "12", "--shrinkage", "0.1", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    lm = load_model(str(tiny_folder), dtype="float32")
    want = fit_gaussian(lm, HOOK, load_corpus(n=6).texts, max_tokens=12, shrinkage=0.1)
    got = Gaussian.load(out)
    torch.testing.assert_close(got.mean, want.mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(got.cov, want.cov, rtol=0, atol=1e-10)
    assert (got.shrinkage, got.n_tokens, got.meta["weights_hash"]) == (
        0.1,
        want.n_tokens,
        lm.weights_hash,
    )
    before = out.read_bytes()
    one_line_error(CliRunner().invoke(app, args), "exists; pass --overwrite")
    assert out.read_bytes() == before

    v = torch.randn(32, generator=torch.Generator().manual_seed(9))
    vec = VectorSet({HOOK: v}, {"model_id": lm.spec, "weights_hash": lm.weights_hash})
    vec_path = vec.save(tmp_path / "v.safetensors")
    r = CliRunner().invoke(
        app,
        [
            "whiten",
            "norm",
            str(vec_path),
            "--gaussian",
            str(out),
            "--out",
            str(tmp_path / "n.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    figs = json.loads((tmp_path / "n.json").read_text())["hooks"][HOOK]
    lib = vector_figures(got, v)
    assert figs == pytest.approx(lib, rel=1e-12)
    assert figs["l2_coeff_per_whitened_unit"] == pytest.approx(
        1 / lib["mahalanobis_norm"], rel=1e-12
    )

    other_hook = gaussian("blocks.0.hook_resid_post", 32, 10).save(tmp_path / "g0.safetensors")
    r = CliRunner().invoke(app, ["whiten", "norm", str(vec_path), "--gaussian", str(other_hook)])
    one_line_error(r, "was fitted at blocks.0.hook_resid_post, not " + HOOK)
    other_model = gaussian(HOOK, 32, 11)
    other_model.meta = {"model": "another", "weights_hash": "0123456789abcdef"}
    other_model.save(tmp_path / "gm.safetensors")
    r = CliRunner().invoke(
        app, ["whiten", "norm", str(vec_path), "--gaussian", str(tmp_path / "gm.safetensors")]
    )
    one_line_error(r, "was fitted on model 'another'", "fit the Gaussian on the vectors' model")


def test_pipeline_whiten_stage_writes_the_library_numbers(tiny_folder, tmp_path):
    """[whiten]: the stage saves a Gaussian per hook equal to fit_gaussians on the first
    `texts` corpus texts, and for the fitted vector set: its norms and the mean Mahalanobis
    distance of the activations from the data on the next `eval_texts` texts, unsteered and
    with the vector added, as computed directly; the report has the section. Bugs caught: the
    steered distance measured without the vector (mutation tried: `own = None` in
    mean_distances -> steered == unsteered), the Gaussian fitted on the evaluation texts,
    a rerun recomputing."""
    from test_pipeline_facts import stage_dir

    from steerdiff.chat import encode
    from steerdiff.interpret.corpus import load_corpus
    from steerdiff.io import read_json
    from steerdiff.pipeline import parse_config, run_experiment
    from steerdiff.replay import hook_activations
    from steerdiff.whiten import fit_gaussians

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Bird {i}?"},
                {"role": "assistant", "content": f"Owl {i}."},
            ]
        }
        for i in range(8)
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    short = dict(objective="sft", max_steps=2, batch_size=4, max_len=48, val_fraction=0.25, lr=0.5)
    raw = {
        "name": "whiten-tiny",
        "model": str(tiny_folder),
        "dtype": "float32",
        "task": {"name": "dataset", "data": str(data)},
        "fits": [{"name": "resid", "hooks": HOOK, **short}],
        "read": {"lens_texts": 0},
        "whiten": {"texts": 6, "eval_texts": 3, "max_tokens": 16, "shrinkage": 0.2},
    }
    summary = run_experiment(parse_config(raw, source="whiten (tiny)"), tmp_path / "runs")
    folder = stage_dir(summary.run_dir, "whiten-")
    out = read_json(folder / "whiten.json")
    lm = load_model(str(tiny_folder), dtype="float32")
    texts = load_corpus(n=9, seed=0).texts
    g = fit_gaussians(lm, [HOOK], texts[:6], 16, shrinkage=0.2)[HOOK]
    saved = Gaussian.load(folder / f"gaussian_{HOOK}.safetensors")
    torch.testing.assert_close(saved.cov, g.cov, rtol=0, atol=1e-10)
    v = VectorSet.load(stage_dir(summary.run_dir, "fit-resid-s0") / "vectors.safetensors", lm)[HOOK]
    (row,) = out["results"]
    assert (row["name"], row["hook"]) == ("resid-s0", HOOK)
    for k, want in vector_figures(g, v).items():
        assert row[k] == pytest.approx(want, rel=1e-9)

    def dist(add: torch.Tensor | None) -> float:
        per = []
        for t in texts[6:9]:
            x = hook_activations(lm.model, [HOOK], torch.tensor([encode(lm.tokenizer, t)[:16]]))[
                HOOK
            ]
            per.append(float(g.distance(x if add is None else x + add).mean()))
        return sum(per) / len(per)

    assert row["distance_unsteered"] == pytest.approx(dist(None), rel=1e-6)
    assert row["distance_steered"] == pytest.approx(dist(v), rel=1e-6)
    assert abs(row["distance_steered"] - row["distance_unsteered"]) > 1e-3
    page = (summary.run_dir / "report.html").read_text()
    assert "Whitening: vectors in the data" in page and "resid-s0" in page
    again = run_experiment(parse_config(raw, source="whiten (tiny)"), tmp_path / "runs")
    assert again.stages["whiten"].cached
