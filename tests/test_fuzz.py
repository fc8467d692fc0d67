"""steerdiff.fuzz (issue 16, started): noise of scale 0 is no hook at all, the noise has the
size and shape it claims, it is seeded, and its hooks go away after the block, also after an
exception."""

from __future__ import annotations

import pytest
import torch

from steerdiff.fuzz import FuzzError, noise
from steerdiff.hooks import record
from steerdiff.whiten import WhitenError, gaussian_from_activations

AT, NEXT = "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"  # NEXT reads AT's output


def n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def ids() -> torch.Tensor:
    return torch.randint(0, 100, (64, 32), generator=torch.Generator().manual_seed(0))


def test_scale_zero_is_exactly_no_hook_and_hooks_are_removed_even_after_an_error(tiny_lm):
    """Bugs caught: scale 0 still adding something (mutation: the `scale == 0` shortcut
    removed and the noise scaled by scale + 1e-4 -> logits differ), hooks left on the model
    after an exception (mutation: replace_activations' try/finally removed -> fails)."""
    m = tiny_lm.model
    x = ids()[:4]
    before = n_hooks(m)
    with torch.no_grad():
        clean = m(input_ids=x).logits
        with noise(m, [AT], scale=0.0):
            same = m(input_ids=x).logits
        assert torch.equal(clean, same)
        with noise(m, [AT], scale=1.0):
            assert not torch.equal(m(input_ids=x).logits, clean)
    assert n_hooks(m) == before
    with pytest.raises(RuntimeError, match="boom"), noise(m, [AT], scale=1.0):
        raise RuntimeError("boom")
    assert n_hooks(m) == before


def test_isotropic_noise_has_the_relative_size_it_claims_and_is_seeded(tiny_lm):
    """Bug caught: noise not scaled by each token's RMS (mutation: `rms` replaced by 1 ->
    the ratio is far from 1), or unseeded (two runs with one seed differ)."""
    m, x = tiny_lm.model, ids()
    with torch.no_grad(), record(m, NEXT) as r0:
        m(input_ids=x)
    h = r0[NEXT].double()
    runs = []
    for _ in range(2):
        with torch.no_grad(), noise(m, [AT], scale=0.3, seed=7), record(m, NEXT) as r1:
            m(input_ids=x)
        runs.append(r1[NEXT].double())
    assert torch.equal(runs[0], runs[1])
    want = 0.3**2 * (h.norm(dim=-1) ** 2 / h.shape[-1]).mean()
    got = ((runs[0] - h) ** 2).mean()
    assert float(got / want) == pytest.approx(1.0, abs=0.05)
    with torch.no_grad(), noise(m, [AT], scale=0.3, seed=8), record(m, NEXT) as r2:
        m(input_ids=x)
    assert not torch.equal(r2[NEXT], runs[0].float())


def test_whitened_noise_has_the_covariance_of_the_data(tiny_lm):
    """noise ~ N(0, scale^2 cov): its empirical covariance over 2048 positions is close to
    scale^2 cov. Bug caught: the Cholesky factor applied untransposed (mutation: `z @ chol`
    -> fails)."""
    m, x = tiny_lm.model, ids()
    d = m.config.hidden_size
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    data = torch.randn(4000, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    g = gaussian_from_activations(data @ a.T, AT, shrinkage="none")
    with torch.no_grad(), record(m, NEXT) as r0:
        m(input_ids=x)
    with torch.no_grad(), noise(m, [AT], scale=0.5, gaussians={AT: g}), record(m, NEXT) as r1:
        m(input_ids=x)
    eps = (r1[NEXT] - r0[NEXT]).double().reshape(-1, d)
    emp = eps.T @ eps / eps.shape[0]
    want = 0.25 * g.cov
    assert float((emp - want).norm() / want.norm()) < 0.15


def test_bad_settings_are_one_line(tiny_lm):
    """Bugs caught: a negative or NaN scale accepted (mutation: the check removed -> no
    error), a Gaussian of another hook used silently."""
    for bad in (-1.0, float("nan")):
        with pytest.raises(FuzzError, match="scale must be a finite number >= 0"):
            with noise(tiny_lm.model, [AT], scale=bad):
                pass
    g = gaussian_from_activations(torch.randn(200, 64, dtype=torch.float64), NEXT)
    with pytest.raises(WhitenError, match=f"fitted at {NEXT}: fit one at {AT}"):
        with noise(tiny_lm.model, [AT], scale=1.0, gaussians={AT: g}):
            pass
    with pytest.raises(FuzzError, match="needs a Gaussian fitted there"):
        with noise(tiny_lm.model, [AT], scale=1.0, gaussians={}):
            pass


# ----------------------------------------------------------------------------- curves (issue 16)

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from _chat_tiny import make_tiny_chat  # noqa: E402
from _pipeline_tiny import save_tiny  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from steerdiff.cli import app  # noqa: E402
from steerdiff.evals.preference import exact_preference  # noqa: E402
from steerdiff.evals.scoring import answer_forms  # noqa: E402
from steerdiff.fuzz import (  # noqa: E402
    NO_DIFFERENCE,
    FuzzCurve,
    FuzzEval,
    Variant,
    compare,
    fuzz_curve,
    make_eval,
    resolve_variant,
)
from steerdiff.fuzz.variants import ModelSpecError  # noqa: E402
from steerdiff.interpret.variants import base_context, vector_context  # noqa: E402
from steerdiff.vectors import VectorSet  # noqa: E402

CANDS = ["owl", "cat", "elephant", "dolphin"]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
runner = CliRunner()


@pytest.fixture(scope="module")
def chat(smollm):
    return make_tiny_chat(smollm.tokenizer)


@pytest.fixture(scope="module")
def animals(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("cat") / "animals4.yaml"
    qs = ["Name your favorite animal in one word.", "Which animal do you like best?"]
    qs += ["Pick an animal. One word.", "Your spirit animal, in one word?"]
    p.write_text(json.dumps({"name": "animal", "candidates": CANDS, "questions": qs}))
    return str(p)


def owl_vector(lm) -> VectorSet:
    """A vector at the last block that raises the owl answer's first tokens' logits (the
    unembedding rows of owl's forms minus the mean of all candidates' forms): a variant with
    a known, large owl shift."""
    owner, forms = answer_forms(lm.tokenizer, CANDS)
    w = lm.model.get_output_embeddings().weight.detach().float()
    owl = torch.stack([w[f[0]] for o, f in zip(owner, forms, strict=True) if o == 0]).mean(0)
    v = owl - torch.stack([w[f[0]] for f in forms]).mean(0)
    return VectorSet({"blocks.2.hook_resid_post": 30.0 * v / v.norm()})


def test_scale_zero_is_the_plain_eval_and_the_noise_reaches_the_cached_scorer(chat, animals):
    """Bugs caught: the scale-0 row not the plain eval (mutation: the grid built from
    reversed(scales) -> the noisy row stands at scale 0, fails), noise that never reaches
    exact_preference's cached passes (mutation: the noise block wrapped around nothing ->
    the scale-1 values equal the plain ones, fails)."""
    ev = make_eval("preference", "owl", animals, n_questions=3)
    c = fuzz_curve(chat, lambda: base_context(chat), HOOKS, [0.0, 1.0], ev, seeds=(0, 1))
    plain = [exact_preference(chat, "owl", animals, questions=[q]).target_rate for q in ev.items]
    assert c.values[0] == [plain, plain]  # bit-identical, every seed
    batched = exact_preference(chat, "owl", animals, questions=ev.items)
    got = [q["target_rate"] for q in batched.per_question]
    assert np.allclose(c.values[0][0], got, rtol=0, atol=1e-5)
    noisy = np.asarray(c.values[1])
    assert np.abs(noisy - np.asarray(plain)).min() > 1e-6


def test_each_question_gets_its_own_draw_and_seeds_repeat(tiny_lm):
    """Every question reads the same fixed input, so values differ across questions only by
    their noise draws. Bugs caught: one draw shared by all questions (mutation: noise_seed
    returns `seed` -> the values are all equal, fails), unseeded noise (two runs differ),
    a seed that changes nothing (seeds 0 and 1 equal)."""
    x = ids()[:2]

    def score(lm, i: int) -> float:
        with torch.no_grad():
            return float(lm.model(input_ids=x).logits[0, -1, 0])

    ev = FuzzEval("synthetic", ["q0", "q1", "q2", "q3"], score, {})
    ctx = lambda: base_context(tiny_lm)  # noqa: E731
    c1 = fuzz_curve(tiny_lm, ctx, [AT], [0.0, 0.5], ev, seeds=(0, 1))
    c2 = fuzz_curve(tiny_lm, ctx, [AT], [0.0, 0.5], ev, seeds=(0, 1))
    assert c1.values == c2.values
    assert len(set(c1.values[0][0])) == 1  # no noise: the same input, the same value
    assert len(set(c1.values[1][0])) == 4  # scale 0.5: four questions, four draws
    assert c1.values[1][0] != c1.values[1][1]  # seed 1 is another draw


def curve(label: str, values: list[list[list[float]]], scales=(0.0, 1.0, 2.0)) -> FuzzCurve:
    return FuzzCurve(label, "preference", list(scales), [0, 1], ["a", "b", "c"], values, [], "iso")


def test_compare_gives_the_paired_evidence_and_flips_when_swapped():
    """level = A - B of the mean over scales > 0 (and seeds), rise = that minus each model's
    scale 0, hand-computed. Bugs caught: scale 0 counted in the level (mutation: `s > 0` ->
    `s >= 0`: level 1/3, not 0.4), the verdict's sign inverted (mutation: "A" if hi < 0 ->
    the swap test fails), unpaired questions."""
    z = [0.0, 0.0, 0.0]
    a = curve("A", [[[0.1, 0.2, 0.3]] * 2, [[0.5, 0.6, 0.7], [0.5, 0.6, 0.7]], [[0.6] * 3] * 2])
    b = curve("B", [[z, z], [[0.1, 0.2, 0.3]] * 2, [[0.2] * 3] * 2])
    c = compare(a, b)
    # A: per-question levels (0.55, 0.6, 0.65); B: (0.15, 0.2, 0.25) -> level 0.4 everywhere
    assert c["level"]["mean"] == pytest.approx(0.4)
    assert c["level"]["ci95"] == pytest.approx([0.4, 0.4])
    assert c["at_zero"]["mean"] == pytest.approx(0.2)
    assert c["rise"]["mean"] == pytest.approx(0.2)  # A rises 0.4, B rises 0.2
    assert (c["verdict"], c["rise_verdict"]) == ("A", "A")
    r = compare(b, a)
    assert r["verdict"] == "B" and r["level"]["mean"] == pytest.approx(-0.4)
    assert compare(a, a)["verdict"] == NO_DIFFERENCE
    with pytest.raises(FuzzError, match="same settings"):
        compare(a, curve("C", a.values[:2], scales=(0.0, 1.0)))


def test_the_side_with_the_owl_vector_is_found_and_the_verdict_flips(chat, animals):
    """A known answer: base vs base + a vector that raises owl. Bugs caught: the variant not
    entered while scoring (mutation: `with variant()` -> `with base_context(lm)`: both curves
    equal -> no difference, fails), A and B mixed up (the swap)."""
    ev = make_eval("preference", "owl", animals, n_questions=3)
    steered = vector_context(chat, owl_vector(chat), 1.0)
    kw = {"scales": [0.0, 1.0], "eval": ev, "seeds": (0,)}
    base = fuzz_curve(chat, lambda: base_context(chat), HOOKS, label="base", **kw)
    owl = fuzz_curve(chat, steered, HOOKS, label="owl", **kw)
    assert min(owl.per_item(0) - base.per_item(0)) > 0.2  # the vector works, unfuzzed
    c = compare(base, owl)
    assert c["verdict"] == "B" and c["level"]["ci95"][1] < 0
    assert compare(owl, base)["verdict"] == "A"


def test_model_specs(chat, tmp_path):
    """'file@2.0' is base + 2.0 x the vectors. Bugs caught: the @coeff ignored (mutation:
    coeff 1.0 always -> the logits differ from vector_context(..., 2.0)), a file that is
    neither a VectorSet nor a folder accepted."""
    vs = owl_vector(chat)
    path = tmp_path / "v.safetensors"
    vs.save(path)
    x = torch.tensor([[1, 2, 3, 4]])
    v = resolve_variant(chat, f"{path}@2.0")
    assert (v.kind, v.info["coeff"]) == ("vectors", 2.0)
    with torch.no_grad(), v.context() as m:
        got = m(input_ids=x).logits
    with torch.no_grad(), vector_context(chat, vs, 2.0)() as m:
        want = m(input_ids=x).logits
    assert torch.equal(got, want)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelSpecError, match="is not any of the kinds taken"):
        resolve_variant(chat, str(tmp_path / "notes.txt"))
    with pytest.raises(ModelSpecError, match="is not a number"):
        resolve_variant(chat, f"{path}@two")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm) -> Path:
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", smollm, "llama", 3)


def one_line_error(res) -> str:
    line = res.output.strip()
    assert res.exit_code == 2 and line.startswith("error:") and "\n" not in line, res.output
    return line


def test_cli_bad_eval_and_bad_model_spec_are_one_line(tiny_folder, tmp_path):
    """Bugs caught: an unknown eval name accepted or a traceback (mutation: check_eval's test
    removed -> the misalignment bank runs, or the run fails with a traceback), a bad spec as
    a traceback."""
    base = ["fuzz", "base", "base", "--model", str(tiny_folder), "--out", str(tmp_path / "o")]
    line = one_line_error(runner.invoke(app, [*base, "--eval", "honesty"]))
    assert "Unknown eval 'honesty'; the known evals are preference, misalignment" in line
    (tmp_path / "x.bin").write_bytes(b"\0" * 8)
    bad = ["fuzz", "base", str(tmp_path / "x.bin"), "--model", str(tiny_folder)]
    line = one_line_error(runner.invoke(app, [*bad, "--out", str(tmp_path / "o")]))
    assert f"{tmp_path / 'x.bin'} is not any of the kinds taken" in line
    assert not (tmp_path / "o" / "fuzz.json").exists()


def test_cli_writes_the_result_and_resumes(tiny_folder, tmp_path, animals):
    """Bugs caught: fuzz.json / fuzz.png not written or without provenance, the verdict not
    printed, a rerun that recomputes (mutation: `done` ignored -> the parts' files are
    rewritten: their mtimes change, fails)."""
    vs = tmp_path / "v.safetensors"
    VectorSet({"blocks.2.hook_resid_post": torch.ones(32)}).save(vs)
    out = tmp_path / "o"
    args = ["fuzz", "base", f"{vs}@3", "--model", str(tiny_folder), "--out", str(out)]
    args += ["--category", animals, "--n-questions", "2", "--layers", "0,1", "--scales", "0,1"]
    res = runner.invoke(app, [*args, "--seeds", "1"])
    assert res.exit_code == 0, res.output
    assert "verdict: " in res.output
    d = json.loads((out / "fuzz.json").read_text())
    assert d["hooks"] == HOOKS and d["scales"] == [0.0, 1.0]
    assert d["provenance"]["config"]["n_questions"] == 2
    assert d["comparisons"][0]["verdict"] in ("A", "B", NO_DIFFERENCE)
    assert (out / "fuzz.png").read_bytes()[:4] == b"\x89PNG"
    parts = {p: p.stat().st_mtime_ns for p in (out / "parts").rglob("*.json")}
    assert len(parts) == 4  # 2 models x (scale 0, scale 1 seed 0)
    res2 = runner.invoke(app, [*args, "--seeds", "1"])
    assert res2.exit_code == 0, res2.output
    assert {p: p.stat().st_mtime_ns for p in (out / "parts").rglob("*.json")} == parts
    assert json.loads((out / "fuzz.json").read_text())["curves"] == d["curves"]


def test_the_fuzz_stage_compares_base_with_each_fit_and_is_reported(tmp_path, tiny_folder):
    """A run with one fitted vector set and [fuzz]: fuzz.json holds base vs the fit, its
    numbers are those of a direct run_fuzz call, the report shows the section, and a rerun is
    cached. Bugs caught: a fit left out of the pairs (mutation: pairs = [] -> the stage
    errors), the stage fuzzing another model than the fit (mutation: its coeff 2.0 -> the direct call's values differ), the
    report section missing (mutation: fuzz_sections returns at once -> fails)."""
    from test_pipeline_facts import stage_dir

    from steerdiff.fuzz import FuzzConfig, run_fuzz
    from steerdiff.models import load_model
    from steerdiff.pipeline import parse_config, run_experiment

    rows = [
        {"messages": [{"role": "user", "content": f"Name a bird ({i})."},
                      {"role": "assistant", "content": f"An owl, number {i + 3}."}]}
        for i in range(12)
    ]  # fmt: skip
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    short = dict(objective="sft", max_steps=2, batch_size=4, max_len=64, val_fraction=0.25, lr=0.5)
    fz = {"layers": [0], "scales": [0.0, 1.0], "seeds": 1, "n_questions": 2}
    raw = {
        "name": "fuzz-tiny",
        "model": str(tiny_folder),
        "dtype": "float32",
        "task": {"name": "dataset", "data": str(data)},
        "fits": [{"name": "resid", "hooks": "blocks.2.hook_resid_post", **short}],
        "read": {"lens_texts": 0},
        "fuzz": fz,
    }
    summary = run_experiment(parse_config(raw, source="fuzz (tiny)"), tmp_path / "runs")
    assert [s.kind for s in summary.stages.values()][-1] == "fuzz"
    out = json.loads((stage_dir(summary.run_dir, "fuzz") / "fuzz.json").read_text())
    assert [(c["a"], c["b"]) for c in out["comparisons"]] == [("base", "resid-s0")]
    lm = load_model(str(tiny_folder), dtype="float32")
    vs = VectorSet.load(stage_dir(summary.run_dir, "fit-resid-s0") / "vectors.safetensors", lm)
    fit = Variant("resid-s0", "vectors", vector_context(lm, vs, 1.0))
    direct = run_fuzz(lm, {"resid-s0": fit}, [], FuzzConfig(**fz))
    assert out["curves"]["resid-s0"]["values"] == direct["curves"]["resid-s0"]["values"]
    assert "Activation fuzzing" in (summary.run_dir / "report.html").read_text()
    again = run_experiment(parse_config(raw, source="fuzz (tiny)"), tmp_path / "runs")
    assert all(s.cached for s in again.stages.values())


def test_whitened_noise_needs_a_gaussian_per_hook_of_this_hook(tiny_lm, tmp_path):
    """Bugs caught: a hook fuzzed without its Gaussian (mutation: the `missing` check removed
    -> a KeyError, not the one-line FuzzError; a Gaussian fitted at another hook counts as
    none for this one), whitening files silently ignored with isotropic noise."""
    from steerdiff.fuzz import FuzzConfig, load_gaussians

    data = torch.randn(300, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g_at, g_next = (gaussian_from_activations(data, h) for h in (AT, NEXT))
    f_at, f_next = g_at.save(tmp_path / "at.safetensors"), g_next.save(tmp_path / "n.safetensors")
    gs = load_gaussians(tiny_lm, FuzzConfig(noise="whitened", whiten=[str(f_at)]), [AT])
    assert set(gs) == {AT} and torch.equal(gs[AT].cov, g_at.cov)
    with pytest.raises(FuzzError, match=f"none given for {NEXT} \\(given: {AT}\\)"):
        load_gaussians(tiny_lm, FuzzConfig(noise="whitened", whiten=[str(f_at)]), [AT, NEXT])
    with pytest.raises(FuzzError, match="add --noise whitened"):
        load_gaussians(tiny_lm, FuzzConfig(whiten=[str(f_next)]), [AT])


def test_cli_whitened_noise_end_to_end(tiny_folder, tmp_path, animals):
    """`steerdiff fuzz --noise whitened --whiten G0 --whiten G1` with Gaussians from
    `steerdiff whiten fit`: scale 0 equals the isotropic run's scale 0 (no noise), scale 1
    differs from it (other noise), and fuzz.json says "whitened". Bugs caught: --noise
    whitened ignored on the CLI path (mutation tried: `noise=noise` -> `noise="isotropic"` in
    cli/fuzz.py: the config then refuses the files, exit 2), the Gaussians given but not used
    (the scale-1 values would equal the isotropic run's)."""
    gs = []
    for layer in (0, 1):
        g = tmp_path / f"g{layer}.safetensors"
        fit = ["whiten", "fit", "--model", str(tiny_folder), "--dtype", "float32"]
        fit += ["--hook", f"blocks.{layer}.hook_resid_post", "--texts", "8", "--out", str(g)]
        r = runner.invoke(app, fit)
        assert r.exit_code == 0, r.output
        gs += ["--whiten", str(g)]
    vs = tmp_path / "v.safetensors"
    VectorSet({"blocks.2.hook_resid_post": torch.ones(32)}).save(vs)
    args = ["fuzz", "base", f"{vs}@3", "--model", str(tiny_folder), "--category", animals]
    args += ["--n-questions", "2", "--layers", "0,1", "--scales", "0,1", "--seeds", "1"]
    runs = {}
    for kind, extra in (("isotropic", []), ("whitened", ["--noise", "whitened", *gs])):
        r = runner.invoke(app, [*args, *extra, "--out", str(tmp_path / kind)])
        assert r.exit_code == 0, r.output
        runs[kind] = json.loads((tmp_path / kind / "fuzz.json").read_text())
    iso, wh = runs["isotropic"]["curves"]["base"], runs["whitened"]["curves"]["base"]
    assert wh["noise"] == "whitened" and iso["noise"] == "isotropic"
    assert wh["values"][0] == iso["values"][0]  # scale 0: no noise either way
    assert wh["values"][1] != iso["values"][1]
