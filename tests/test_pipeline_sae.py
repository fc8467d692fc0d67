"""The [sae] section of an experiment (issue 15): every fitted vector set and LoRA baseline
read in an SAE's latents (interpret.sae_read) exactly as a direct call does, an SAE trained
by the run itself ([sae.train]), the report's SAE sections, and one-line errors for a bad
[sae] table or an SAE that does not fit the model, before any stage runs.

Tiny random SmolLM2-shaped models (SmolLM2's tokenizer, 2 layers, 32 wide) and a random
TopK SAE: the figures are meaningless, what the run does (stages, files, report, errors) is
the real thing."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest
import torch
from _pipeline_tiny import save_tiny
from test_pipeline_facts import assert_invalid_experiment, stage_dir

from steerdiff.interpret.corpus import load_corpus
from steerdiff.interpret.sae_decompose import decompose_vector
from steerdiff.interpret.sae_effects import latent_effects
from steerdiff.io import read_json
from steerdiff.models import load_model
from steerdiff.pipeline import parse_config, run_experiment
from steerdiff.pipeline.config import ConfigError
from steerdiff.sae import SAE, load_sae, save_sae
from steerdiff.vectors import VectorSet

HOOK = "blocks.1.hook_resid_post"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny2", smollm, "llama", 2)


def random_sae(folder: Path, d_in: int = 32, d_sae: int = 64, hook: str = HOOK) -> Path:
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    sae = SAE(
        W_enc=w_dec.T.clone(),
        b_enc=torch.zeros(d_sae),
        W_dec=w_dec,
        b_dec=torch.zeros(d_in),
        activation="topk",
        k=8,
        hook=hook,
    )
    return save_sae(sae, folder)


def experiment(model: Path, data: Path, sae: dict) -> dict:
    """Your own chat data (12 rows) -> a vector at the SAE's hook, q/k/v biases and a LoRA,
    2 steps each -> [sae] readings on 12 corpus texts."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Name a bird ({i})."},
                {"role": "assistant", "content": f"An owl, number {i + 3}."},
            ]
        }
        for i in range(12)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    short = dict(objective="sft", max_steps=2, batch_size=4, max_len=64, val_fraction=0.25, lr=0.5)
    return {
        "name": "sae-tiny",
        "model": str(model),
        "dtype": "float32",
        "task": {"name": "dataset", "data": str(data)},
        "fits": [
            {"name": "resid", "hooks": HOOK, **short},
            {"name": "qkv", "hooks": "blocks.*.attn.hook_{q,k,v}", **short},
        ],
        "baselines": [{"kind": "lora", **short, "lr": 0.01}],
        "read": {"lens_texts": 0},
        "sae": {"texts": 12, "max_tokens": 24, "top": 5, "dashboards": 2, **sae},
    }


def test_every_fit_and_baseline_is_read_as_a_direct_call_and_reported(tmp_path, tiny_folder):
    """Bugs this catches: the stage decomposing another vector than the fit's (or the mean
    difference when the set has a vector at the hook), latent effects computed with the
    vectors not applied / on other texts, a subject left out (the LoRA, or a set without a
    vector at the hook), the report missing a subject's section, and a rerun recomputing."""
    sae_path = random_sae(tmp_path / "sae")
    raw = experiment(tiny_folder, tmp_path / "d.jsonl", {"path": str(sae_path)})
    summary = run_experiment(parse_config(raw, source="sae (tiny)"), tmp_path / "runs")
    kinds = [s.kind for s in summary.stages.values()]
    assert kinds[-1] == "sae" and kinds.count("sae") == 1
    out = read_json(stage_dir(summary.run_dir, "sae-") / "sae.json")
    by_name = {r["name"]: r for r in out["results"]}
    assert set(by_name) == {"resid-s0", "qkv-s0", "baseline-lora"}

    lm = load_model(str(tiny_folder), dtype="float32")
    sae = load_sae(sae_path, lm)
    fit_dir = stage_dir(summary.run_dir, "fit-resid-s0")
    vs = VectorSet.load(fit_dir / "vectors.safetensors", lm)
    want = decompose_vector(sae, vs[HOOK]).top(5)
    got = by_name["resid-s0"]["decomposition"]
    assert got["of"] == "vector"
    assert [r["latent"] for r in got["top"][:5]] == [r["latent"] for r in want]
    assert got["top"][0]["cosine"] == pytest.approx(want[0]["cosine"], abs=1e-5)
    corpus = load_corpus(None, n=12, seed=0)
    direct = latent_effects(lm, sae, corpus, vectors=vs, max_tokens=24, first_k=5)
    stored = torch.tensor(by_name["resid-s0"]["effects"]["all_mean"])
    torch.testing.assert_close(stored, direct.all_mean.float(), atol=1e-5, rtol=1e-4)
    assert by_name["qkv-s0"]["decomposition"]["of"] == "mean activation difference"
    assert by_name["baseline-lora"]["change"]["mode"] == "finetuned"

    page = (summary.run_dir / "report.html").read_text()
    for name in ("resid-s0", "qkv-s0", "baseline-lora"):
        assert f"SAE reading: {html.escape(name)}" in page
    # the section holds the reading itself: the best latent's dashboard (bug: an empty section)
    assert f"<h4>Latent {got['top'][0]['latent']}</h4>" in page
    again = run_experiment(parse_config(raw, source="sae (tiny)"), tmp_path / "runs")
    assert [s.cached for s in again.stages.values()] == [True] * len(again.stages)


def test_the_run_trains_its_own_sae_and_reads_with_it(tmp_path, tiny_folder):
    """[sae.train]: the SAE is trained in a stage of the run (its metrics in the report) and
    the readings use it (bug caught: the read stage loading another SAE than the trained one
    at `hook`, or the trained SAE's folder not where the read stage looks)."""
    train = {"hooks": [HOOK], "expansion": 2, "k": 4, "tokens": 2048, "batch_tokens": 256}
    train |= {"max_len": 32, "buffer_tokens": 512, "model_batch": 4, "eval_texts": 4}
    train |= {"eval_tokens": 256, "n_corpus": 40, "n_chat": 8, "n_numbers": 8}
    raw = experiment(tiny_folder, tmp_path / "d.jsonl", {"train": train})
    raw["fits"], raw["baselines"] = raw["fits"][:1], []
    summary = run_experiment(parse_config(raw, source="sae (tiny)"), tmp_path / "runs")
    trained = stage_dir(summary.run_dir, "sae_train-") / HOOK
    out = read_json(stage_dir(summary.run_dir, "sae-") / "sae.json")
    assert out["sae"]["path"] == str(trained / "sae_weights.safetensors")
    assert out["sae"]["d_sae"] == 64
    assert "SAE training" in (summary.run_dir / "report.html").read_text()


@pytest.mark.parametrize(
    ("sae", "message"),
    [
        ({}, "sae: give exactly one of path"),
        ({"path": "x", "train": {"hooks": [HOOK]}}, "sae: give exactly one of path"),
        ({"train": {"hooks": [HOOK]}, "hook": "blocks.0.hook_resid_post"}, "sae: hook:"),
        ({"path": "x", "texts": 0}, "sae.texts"),
    ],
)
def test_a_bad_sae_table_is_one_line_naming_the_key(tmp_path, sae, message):
    """Bug caught: the [sae] validator dropped (mutation: _one_sae returns at once -> no
    error for a table with neither or both)."""
    raw = experiment(Path("m"), tmp_path / "d.jsonl", sae)
    assert_invalid_experiment(tmp_path, raw, message)


def test_an_sae_that_does_not_fit_the_model_fails_before_any_stage(tmp_path, tiny_folder):
    """Bug caught: the SAE checked only when the sae stage starts, after every fit ran
    (mutation: the check removed from checks.py -> the run makes stages, then fails)."""
    sae_path = random_sae(tmp_path / "sae16", d_in=16)
    raw = experiment(tiny_folder, tmp_path / "d.jsonl", {"path": str(sae_path)})
    with pytest.raises(ConfigError, match=r"sae\.path") as e:
        run_experiment(parse_config(raw, source="sae (tiny)"), tmp_path / "runs")
    assert "\n" not in str(e.value) and "d_in=16" in str(e.value)
    assert not (tmp_path / "runs").exists()
