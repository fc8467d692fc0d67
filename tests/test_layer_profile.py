"""Layer profiles across families (steerdiff.layer_profile) and the perception-vs-behaviour
probe (steerdiff.perception_probe), on tiny random chat models of two families with
different layer counts (llama, 3 layers; gemma3, 5 layers)."""

from __future__ import annotations

import json

import pytest
import torch
from _chat_tiny import make_tiny_chat

from steerdiff.evals import Steering, candidate_logprobs, load_category, question_prompts
from steerdiff.extract import Exclusion, default_contrast_questions, trait_vectors
from steerdiff.hooks import record, steer
from steerdiff.intervals import mean_ci95
from steerdiff.layer_profile import (
    ProfileConfig,
    ProfileError,
    layer_profile,
    parse_layers,
    peak,
    profile_figure,
)
from steerdiff.models import LoadedModel
from steerdiff.perception_probe import (
    BEHAVIOUR_ITEMS,
    NEUTRAL_REVIEWS,
    behaviour_items,
    log_odds,
    perception_items,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_chat(tokenizer, model_type: str, layers: int, seed: int = 0) -> LoadedModel:
    return make_tiny_chat(tokenizer, seed, model_type, layers, spec=f"tiny-{model_type}-{layers}")


@pytest.fixture(scope="module")
def pair(smollm):
    return [
        tiny_chat(smollm.tokenizer, "llama", 3),
        tiny_chat(smollm.tokenizer, "gemma3_text", 5, seed=1),
    ]


def small(**kw) -> ProfileConfig:
    base = dict(
        layers="all",
        strengths=[-4.0, 4.0],
        n_questions=2,
        ci_questions=4,
        n_contrast=3,
        n_neutral=2,
        kl_tokens=3,
        kl_bound=None,
    )
    return ProfileConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def profiled(pair):
    return layer_profile(pair, small(), progress=False)


def test_profile_plot_has_both_families_on_one_relative_depth_axis(profiled):
    """The acceptance figure: add and subtract panels share one x axis, relative depth
    layer / (n_layers - 1) in [0, 1], a line per family, labels naming both. Bug caught: the
    raw layer index (or layer / n_layers) on the x axis, so a 30- and an 18-layer model do not
    line up (mutation tried: depth = layer -> the llama line's x is [0, 1, 2], not [0, 0.5, 1])."""
    fig = profile_figure(profiled)
    add, sub, kl = fig.axes[:3]
    assert add.get_shared_x_axes().joined(add, sub) and add.get_shared_x_axes().joined(add, kl)
    assert add.get_xlim() == (0.0, 1.0)
    want = {"llama": [0.0, 0.5, 1.0], "gemma3_text": [0.0, 0.25, 0.5, 0.75, 1.0]}
    for ax in (add, sub):
        lines = {
            ln.get_label(): list(ln.get_xdata()) for ln in ax.get_lines() if "(" in ln.get_label()
        }
        assert len(lines) == 2
        for fam, xs in want.items():
            (lab,) = [k for k in lines if f"({fam}," in k]
            assert lines[lab] == pytest.approx(xs)
        assert "gemma3_text" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_rescored_effect_equals_the_exact_scorer_with_negative_strengths(pair, profiled):
    """Each layer's add / subtract effect is the exact scorer's per-question target share at
    the row's strength (negative for subtract) minus unsteered, on the questions AFTER the
    sweep's n_questions, with mean_ci95 over them; the peak is the extreme layer. Bugs caught:
    the subtract row scored at +|strength| (mutation tried: abs(strength) -> effect differs),
    re-scoring on the sweep's own questions (mutation tried: qs = questions[:ci] -> fails)."""
    cfg = profiled.config
    cat = load_category("animals")
    owl = cat.candidates.index("owl")
    for lm, m in zip(pair, profiled.models, strict=True):
        prompts = question_prompts(lm, cat.questions[2:6], None)
        base = torch.softmax(candidate_logprobs(lm, prompts, cat.candidates)[0], -1)[:, owl]
        assert m.baseline == pytest.approx(float(base.mean()), abs=1e-5)
        assert m.provenance["weights_hash"] == lm.weights_hash
        hooks = [f"blocks.{la}.hook_resid_post" for la in m.layers]
        questions = default_contrast_questions()[: cfg.n_contrast]
        ex = Exclusion(1, 8.0)  # the sweep's default exclusion
        vecs = trait_vectors(lm, "owl", cat.name, ["last"], hooks, questions, exclude=ex)["last"]
        for d, sign in (("add", 1), ("subtract", -1)):
            effects = []
            for la, row in zip(m.layers, getattr(m, d), strict=True):
                assert row["strength"] == sign * 4.0
                hook = f"blocks.{la}.hook_resid_post"
                vec = vecs[hook]
                st = Steering({hook: vec}, coeff=row["strength"])
                share = torch.softmax(candidate_logprobs(lm, prompts, cat.candidates, st)[0], -1)
                mean, ci = mean_ci95((share[:, owl] - base).tolist())
                assert row["effect"] == pytest.approx(mean, abs=1e-5)
                assert row["ci95"] == pytest.approx(list(ci), abs=1e-5)
                dlog = torch.log(share[:, owl]) - torch.log(base)
                assert row["log_effect"] == pytest.approx(float(dlog.mean()), abs=1e-4)
                effects.append(row["effect"])
            best = max(range(len(effects)), key=lambda i: sign * effects[i])
            assert m.peak[d]["layer"] == m.layers[best]
            assert m.peak[d]["depth"] == pytest.approx(m.layers[best] / (m.n_layers - 1))
            logs = [r["log_effect"] for r in getattr(m, d)]
            best = max(range(len(logs)), key=lambda i: sign * logs[i])
            assert m.peak[d]["log"]["layer"] == m.layers[best]
    json.dumps(profiled.to_dict())  # JSON-able as written


def test_parse_layers_and_config_errors():
    """every:k keeps the last layer (relative depth 1 on every model); bad specs and
    strengths are one-line ProfileErrors. Bug caught: every:k dropping the last layer
    (mutation tried: no n-1 appended -> [0, 2] for 4 layers)."""
    assert parse_layers("every:2", 4) == [0, 2, 3]
    assert parse_layers("every:2", 5) == [0, 2, 4]
    assert parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers("0,2", 3) == [0, 2]
    with pytest.raises(ProfileError, match="layers 0-2"):
        parse_layers("0,7", 3)
    with pytest.raises(ProfileError, match="every:k"):
        parse_layers("every:0", 3)
    with pytest.raises(ProfileError, match="strengths is empty"):
        small(strengths=[]).check()
    with pytest.raises(ProfileError, match="> 50"):
        small(n_questions=40, ci_questions=20).check()


def test_peak_prefers_layers_within_the_kl_bound():
    """The peak is the largest effect among layers within the KL bound (a broken model's
    big shift is not a peak), all layers if none is; "log" ranks by the log-share effect.
    Bug caught: the KL flag ignored (mutation tried: no within_kl filter -> layer 0)."""

    def row(effect, log, ok):
        return {
            "effect": effect,
            "ci95": [effect, effect],
            "strength": -2.0,
            "log_effect": log,
            "log_ci95": [log, log],
            "within_kl": ok,
        }

    rows = [row(-0.9, -1.0, False), row(-0.2, -5.0, True), row(-0.3, -2.0, True), {}]
    got = peak(rows, [0, 4, 8, 12], [0.0, 1 / 3, 2 / 3, 1.0], -1.0)
    assert (got["layer"], got["depth"], got["effect"]) == (8, 2 / 3, -0.3)
    assert (got["log"]["layer"], got["log"]["log_effect"]) == (4, -5.0)
    rows = [row(-0.9, -1.0, False), row(-0.2, -5.0, False)]
    assert peak(rows, [0, 4], [0.0, 1.0], -1.0)["layer"] == 0
    assert peak(rows, [0, 4], [0.0, 1.0], 1.0)["layer"] == 4


def test_perception_steers_only_the_review_and_behaviour_only_the_reply(pair):
    """The perception mask covers exactly the review's tokens and the behaviour mask exactly
    the reply's; steering with the mask changes the hook's activation by coeff x v there and
    leaves every other position bit-identical; the batched read-out equals one pass per item.
    Bugs caught: a mask off by one token (mutation tried: the review's span shifted one token
    right -> decoded text and the diff differ); the batch read at the padded row end
    (mutation tried: last = width - 1 -> log-odds differ)."""
    lm = pair[0]
    tok = lm.tokenizer
    p_items, b_items = perception_items(lm), behaviour_items(lm)
    for it, text in zip(p_items, NEUTRAL_REVIEWS, strict=True):
        assert tok.decode([i for i, m in zip(it.ids, it.mask, strict=True) if m]) == text
        assert not it.mask[-1]  # the read position is not steered
    for it, (_, reply) in zip(b_items, BEHAVIOUR_ITEMS, strict=True):
        assert tok.decode([i for i, m in zip(it.ids, it.mask, strict=True) if m]) == reply
        assert it.mask[-1]  # the reply's last token is the model's own, steered
    it = p_items[0]
    ids, mask = torch.tensor([it.ids]), torch.tensor([it.mask])
    hook = "blocks.1.hook_resid_post"
    v = torch.randn(64)
    with record(lm.model, [hook]) as base:
        lm.model(input_ids=ids)
    with record(lm.model, [hook]) as got, steer(lm.model, {hook: v}, 2.0, positions=mask):
        lm.model(input_ids=ids)
    diff = got[hook][0] - base[hook][0]
    assert torch.equal(diff[~mask[0]], torch.zeros_like(diff[~mask[0]]))
    assert torch.allclose(diff[mask[0]], (2.0 * v).expand(int(mask.sum()), -1), atol=1e-5)
    # the probe's batched (right-padded) log-odds equal each item's own masked pass
    got = log_odds(lm, p_items, v, hook, 2.0)
    for it, g in zip(p_items, got, strict=True):
        ids, mask = torch.tensor([it.ids]), torch.tensor([it.mask])
        with steer(lm.model, {hook: v}, 2.0, positions=mask):
            lp = torch.log_softmax(lm.model(input_ids=ids).logits[0, -1].float(), -1)
        want = float(torch.logsumexp(lp[it.yes], 0) - torch.logsumexp(lp[it.no], 0))
        assert g == pytest.approx(want, abs=1e-4)
    assert got != pytest.approx(log_odds(lm, p_items, None, hook, 0.0), abs=1e-3)


def test_cli_profile_bad_input_is_one_line():
    """Bad input through `steerdiff sweep --profile`: exit 2 and one `error:` line naming
    the option. Bug caught: a ProfileError escaping as a traceback (mutation tried: a plain
    ValueError for empty strengths -> exit 1 with a traceback)."""
    from typer.testing import CliRunner

    from steerdiff.cli import app

    cases = [
        (["--models", ","], "--models is empty"),
        (["--strengths", ""], "strengths is empty"),
        (["--layers", "every:0"], "every:k"),
        (["--readouts", "last,pca"], "one readout"),
        (["--models", "/no/such/model-folder"], "/no/such/model-folder"),
    ]
    for args, msg in cases:
        r = CliRunner().invoke(app, ["sweep", "--profile", *args])
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output and r.output.strip().startswith("error:"), r.output
        assert len(r.output.strip().splitlines()) == 1, r.output


def test_cli_profile_writes_files_and_resumes(pair, monkeypatch, tmp_path):
    """`sweep --profile` writes profile.json/.png and perception.png with the options given
    (the sweep's own default strengths 1,2,4,8 and kl-bound 0.5 do not leak in); a rerun
    reuses the finished models. Bugs caught: --strengths not reaching the config (mutation
    tried: options ignored -> strengths [-8..8]); the rerun recomputing (mutation tried: no
    resume -> profile_model called)."""
    from typer.testing import CliRunner

    import steerdiff.layer_profile as lp
    import steerdiff.models as models
    from steerdiff.cli import app

    by = {"a": pair[0], "b": pair[1]}
    monkeypatch.setattr(models, "load_model", lambda spec, dtype, device: by[spec])
    out = tmp_path / "prof"
    args = ["sweep", "--profile", "--models", "a,b", "--layers", "every:2", "--strengths", "-2,2"]
    args += ["--questions", "2", "--perception", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} == {
        "profile.json",
        "profile.png",
        "perception.png",
        "models",
    }
    data = json.loads((out / "profile.json").read_text())
    assert data["config"]["strengths"] == [-2.0, 2.0] and data["config"]["kl_bound"] == 1.0
    assert [m["layers"] for m in data["models"]] == [[0, 2], [0, 2, 4]]
    assert [p["family"] for p in data["peaks"]] == ["llama", "gemma3_text"]
    assert len(data["models"][1]["perception"]["dominant"]) == 3

    def boom(*a, **k):
        raise AssertionError("recomputed a finished model")

    monkeypatch.setattr(lp, "profile_model", boom)
    r2 = CliRunner().invoke(app, args)
    assert r2.exit_code == 0, r2.output
    assert json.loads((out / "profile.json").read_text())["models"] == data["models"]


def test_pipeline_stage_and_report_section(pair, monkeypatch, tmp_path):
    """[profile] in an experiment: the run's model first, then the table's models, into the
    stage folder (profile.json/.png, perception.png), cached on a rerun; the report section
    shows the figures and one peak row per model and direction, as in profile.json. Bugs
    caught: the run's model left out (mutation tried: models = table's only -> 1 model);
    a peak row from the other direction (mutation tried: "add" read for both -> rows differ)."""
    import steerdiff.models as models
    from steerdiff.pipeline.config import parse_config
    from steerdiff.pipeline.profile_stage import stage_profile
    from steerdiff.pipeline.stages import RunState
    from steerdiff.report.html import Figure, Report, Table
    from steerdiff.report.profile import profile_sections
    from steerdiff.report.run_folder import RunFolder, read_stage

    monkeypatch.setattr(models, "load_model", lambda spec, dtype, device: pair[1])
    table = small(models=["g"], strengths=[-2.0, 2.0], perception=True).model_dump()
    cfg = parse_config({"name": "p", "model": "default", "profile": table}, "exp.toml")
    state = RunState(cfg, tmp_path)
    res = stage_profile(state, pair[0], [], [])
    data = json.loads((res.path / "profile.json").read_text())
    assert [m["n_layers"] for m in data["models"]] == [3, 5]
    assert {"profile.png", "perception.png"} <= {p.name for p in res.path.iterdir()}
    assert stage_profile(state, pair[0], [], []).cached

    r = Report("t")
    profile_sections(r, RunFolder(tmp_path, {}, [read_stage(res.path)]))
    (sec,) = r.sections
    assert sum(isinstance(b, Figure) for b in sec.blocks) == 2
    peaks = [b for b in sec.blocks if isinstance(b, Table)][0].rows
    want = [(p["model"], d, p[d]["depth"]) for p in data["peaks"] for d in ("add", "subtract")]
    assert [(x["model"], x["direction"], x["relative depth"]) for x in peaks] == [
        (m, d, round(x, 3)) for m, d, x in want
    ]
