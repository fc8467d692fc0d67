"""The teacher steered by an SAE latent (kind "sae"): what it adds, its spec, its errors."""

from __future__ import annotations

import json

import pytest
import torch
from _read_helpers import one_line_error, tiny_model_folder
from pydantic import ValidationError
from typer.testing import CliRunner

from steerdiff.cli import app
from steerdiff.hooks import steer
from steerdiff.io import file_sha256
from steerdiff.sae import SAE, save_sae
from steerdiff.teachers import TeacherConfig, TeacherError, build_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOK = "blocks.1.hook_resid_post"  # tiny models: 3 layers, d_model 64


def random_sae(d_in: int = 64, d_sae: int = 128, hook: str = HOOK, seed: int = 0) -> SAE:
    """A seeded random ReLU SAE whose decoder rows are unit norm (encoder = decoder^T)."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    return SAE(w_dec.T.clone(), torch.zeros(d_sae), w_dec, torch.zeros(d_in), hook=hook)


@pytest.fixture
def sae_folder(tmp_path):
    return save_sae(random_sae(), tmp_path / "sae")


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[:, -1]  # [batch, vocab]


def test_sae_teacher_adds_coeff_times_the_decoder_row(tiny_lm, sae_folder):
    """Bug: the teacher steers with the wrong latent (W_dec[N+1], an encoder column
    W_enc[:, N]) or forgets coeff. Its next-token logits, generating and scoring, must equal
    the base model steered by hand with coeff * W_dec[N] at the SAE's hook."""
    n, coeff = 5, 3.0
    t = build_teacher({"kind": "sae", "sae": str(sae_folder), "latent": n, "coeff": coeff}, tiny_lm)
    ids = torch.randint(2, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    w_dec = random_sae().W_dec
    with steer(tiny_lm.model, {HOOK: coeff * w_dec[n]}):
        by_hand = logits(tiny_lm.model, ids)
    with t.generating() as model:
        generating = logits(model, ids)
    with t.scoring() as model:
        scoring = logits(model, ids)
    torch.testing.assert_close(generating, by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(scoring, by_hand, atol=1e-5, rtol=0)
    # the steering is visible: the base model's logits are far from the teacher's
    assert float((logits(tiny_lm.model, ids) - by_hand).abs().max()) > 0.05


def test_spec_records_the_sae_and_round_trips(tiny_lm, sae_folder):
    """Bug: the manifest's spec loses the latent / coeff / SAE (a fit rebuilding the teacher
    from a dataset's manifest would steer with something else), or the SAE file is swapped
    after the data was written and the rebuilt teacher silently differs."""
    cfg = TeacherConfig(kind="sae", sae=str(sae_folder), latent=7, coeff=2.5)
    t = build_teacher(cfg, tiny_lm)
    spec = json.loads(json.dumps(t.spec()))  # as a manifest stores it
    weights = sae_folder / "sae_weights.safetensors"
    assert spec == {
        "kind": "sae",
        "sae": str(sae_folder),
        "sae_sha256": file_sha256(weights),
        "hook": HOOK,
        "latent": 7,
        "coeff": 2.5,
        "positions": "all",
        "hooks": [HOOK],
    }
    again = build_teacher(spec, tiny_lm)
    assert again.spec() == spec
    torch.testing.assert_close(again.vectors[HOOK], random_sae().W_dec[7], atol=0, rtol=0)
    # another SAE saved over the same folder: the recorded sha256 no longer matches
    save_sae(random_sae(seed=1), sae_folder)
    with pytest.raises(TeacherError, match="changed since this teacher was recorded") as e:
        build_teacher(spec, tiny_lm)
    assert "\n" not in str(e.value)


def test_config_needs_sae_and_latent_only_for_kind_sae(sae_folder):
    """Bug: a [teacher] table with kind = 'sae' but no latent, or an sae path on a steered
    teacher (silently ignored), is accepted."""
    with pytest.raises(ValidationError, match="kind 'sae' needs both sae"):
        TeacherConfig(kind="sae", sae=str(sae_folder))
    with pytest.raises(ValidationError, match="are for kind = 'sae', not 'steered'"):
        TeacherConfig(kind="steered", latent=3)


@pytest.mark.parametrize(
    "sae, latent, want",
    [
        (random_sae(), 128, "--latent 128): Latent 128 is out of range for"),
        (random_sae(), -1, "use an index in 0-127"),
        (random_sae(d_in=32), 0, "has d_in=32 but hook 'blocks.1.hook_resid_post'"),
        (random_sae(hook="blocks.7.hook_resid_post"), 0, "reads hook 'blocks.7.hook_resid_post'"),
    ],
    ids=["latent-too-big", "latent-negative", "other-width", "other-hook"],
)
def test_bad_sae_or_latent_is_one_line_teacher_error(tiny_lm, tmp_path, sae, latent, want):
    """Bug: an out-of-range latent indexes W_dec from the end (-1) or raises IndexError; an
    SAE of another width or hook steers the wrong place or fails deep inside a forward."""
    folder = save_sae(sae, tmp_path / "sae")
    with pytest.raises(TeacherError) as e:
        build_teacher({"kind": "sae", "sae": str(folder), "latent": latent}, tiny_lm)
    msg = str(e.value)
    assert want in msg and "\n" not in msg and f"--sae {folder}" in msg, msg


runner = CliRunner()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("m") / "tiny")


def generate(model_folder, out, *args):
    return runner.invoke(
        app,
        ["generate", "--model", str(model_folder), "--out", str(out), *args, "--n-prompts", "2"],
    )


def test_cli_bad_sae_teacher_options_one_line_exit_2(model_folder, tmp_path):
    """Bug: a bad --latent / --sae surfaces as a traceback, or writes a partial dataset;
    --sae given to another teacher kind is silently ignored."""
    small = save_sae(random_sae(d_in=32), tmp_path / "small")
    good = save_sae(random_sae(), tmp_path / "good")
    out = tmp_path / "d.jsonl"
    cases = [
        (["--teacher", "sae", "--sae", str(good), "--latent", "500"], ["--latent 500", "0-127"]),
        (["--teacher", "sae", "--sae", str(small), "--latent", "0"], [str(small), "d_in=32"]),
        (["--teacher", "sae", "--latent", "3"], ["--teacher sae needs --sae PATH"]),
        (["--teacher", "sae", "--sae", str(good)], ["--teacher sae needs --latent N"]),
        (["--teacher", "prompt", "--sae", str(good)], ["--sae is for --teacher sae"]),
        (["--teacher", "steered", "--latent", "3"], ["--latent is for --teacher sae"]),
    ]
    for args, wants in cases:
        line = one_line_error(generate(model_folder, out, *args))
        assert all(w in line for w in wants), (args, line)
        assert not out.exists() and list(tmp_path.glob("d.jsonl*")) == []


def test_experiment_with_a_bad_latent_fails_before_any_stage(model_folder, tmp_path):
    """Bug: the pipeline does not check an sae teacher before the first stage: a latent out
    of range fails minutes later inside the data stage, after a run folder was made."""
    from steerdiff.pipeline import run_experiment
    from steerdiff.pipeline.config import ConfigError, parse_config

    folder = save_sae(random_sae(), tmp_path / "sae")
    raw = {
        "name": "x",
        "model": str(model_folder),
        "teacher": {"kind": "sae", "sae": str(folder), "latent": 128, "coeff": 4.0},
        "fits": [{"name": "v", "hooks": HOOK}],
    }
    with pytest.raises(ConfigError) as e:
        run_experiment(parse_config(raw, source="e.toml"), runs_dir=tmp_path / "runs")
    msg = str(e.value)
    assert msg.startswith(f"e.toml: teacher.sae = '{folder}'") and "0-127" in msg, msg
    assert "\n" not in msg and not (tmp_path / "runs").exists()
