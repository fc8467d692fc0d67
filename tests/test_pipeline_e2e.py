"""Experiments end to end on tiny stand-ins of the embedded models (see _pipeline_tiny):
the two example files the README names (cross-family student, necessity check) run as
written but at tiny scale, a changed fit setting re-runs only what reads it, and every
stage.json records what made it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tomllib
import torch
from _pipeline_tiny import load_toml, shrink, tiny_pair, write_yaml

import steerdiff
from steerdiff.io import read_json
from steerdiff.models import load_model
from steerdiff.pipeline import load_config, parse_config, run_experiment
from steerdiff.vectors import VectorSet

EXAMPLES = Path(__file__).parents[1] / "examples"


# tiny models on a shared 2-core machine run ~5x faster on one thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smollm) -> tuple[Path, Path]:
    """(SmolLM2-shaped teacher folder, Gemma-3-270M-shaped student folder)."""
    return tiny_pair(tmp_path_factory.mktemp("models"), smollm)


def run_example(name: str, tmp_path: Path, models: tuple[Path, Path], **shrink_kw):
    """examples/NAME at tiny scale on the stand-in models; the summary and the config."""
    raw = shrink(load_toml(EXAMPLES / name), **shrink_kw)
    raw["model"] = str(models[0])
    if "student_model" in raw:
        raw["student_model"] = str(models[1])
    cfg = load_config(write_yaml(tmp_path / name.replace(".toml", ".yaml"), raw))
    return run_experiment(cfg, tmp_path / "runs"), cfg


def stage_of(summary, kind: str):
    (s,) = [s for s in summary.stages.values() if s.kind == kind]
    return s


def test_cross_family_example_runs_with_the_student_scored_against_its_own_base(
    tmp_path, tiny_models
):
    """examples/cross_family.toml (student_model: the teacher's model writes the data, another
    model is fitted on it), at tiny scale. Bugs this catches: the fit stage applied the
    teacher's blocks.24 vector to the 18-layer student to compute "teacher" losses (the run
    died in the fit stage); the report compared the student with the teacher model's base;
    and any change that stops the example file from running."""
    teacher_dir, student_dir = tiny_models
    summary, cfg = run_example("cross_family.toml", tmp_path, tiny_models)
    assert cfg.student_model == str(student_dir) and cfg.teacher.hook == "blocks.24.hook_resid_post"
    assert [s.name for s in summary.stages.values()] == [
        "teacher-vector-main",
        "data-main",
        "fit-gemma-resid-post-mid-s0",
        "eval",
        "read",
    ]
    fit = stage_of(summary, "fit")
    # no teacher of another model: no teacher loss, no gap closed, and the stage says why
    assert fit.info["teacher_val_loss"] is None and fit.info["gap_closed"] is None
    assert fit.info["teacher_reference"].startswith(
        f"none: the data's teacher runs on {str(teacher_dir)!r}, another model"
    )
    # the student's own losses: a random 49152-token model starts near ln(vocab) over the
    # full vocabulary; scored under the data's decoding constraint (the default) it is far
    # lower (only a few dozen digit/separator tokens are allowed at each step)
    assert fit.info["scored_under_constraint"] is True
    assert fit.info["base_val_loss_unconstrained"] == pytest.approx(math.log(49152), abs=0.1)
    assert fit.info["base_val_loss"] < math.log(64)
    assert fit.info["fitted_val_loss"] == pytest.approx(fit.info["base_val_loss"], abs=0.05)
    meta = read_json(fit.path / "stage.json")
    assert meta["provenance"]["model_id"] == str(student_dir)
    assert meta["provenance"]["model_type"] == "gemma3_text"
    vs = VectorSet.load(fit.path / "vectors.safetensors", model=load_model(student_dir))
    assert list(vs) == ["blocks.9.hook_resid_post"] and vs["blocks.9.hook_resid_post"].shape == (
        32,
    )
    # every evaluated row names the model it ran on; the student pairs with student-base
    models = {r["name"]: r["model"] for r in summary.results}
    assert models == {
        "base": str(teacher_dir),
        "student-base": str(student_dir),
        "teacher (steered)": str(teacher_dir),
        "gemma-resid-post-mid-s0": str(student_dir),
    }
    assert all(len(r["per_question"]) == 2 for r in summary.results)
    page = summary.report.read_text()
    assert "gemma-resid-post-mid-s0 (student, model " + str(student_dir) in page
    assert "vs its base model (student-base)" in page


def test_necessity_example_runs(tmp_path, tiny_models):
    """examples/necessity.toml at tiny scale: the prompted teacher writes while the contrast
    vector is projected out from blocks.12 on; q/k/v biases are fitted at every layer.
    Catches: the ablation hooks not reaching every later layer, a prompt teacher losing its
    system prompt, and any change that stops the example file from running."""
    summary, cfg = run_example("necessity.toml", tmp_path, tiny_models)
    vec = stage_of(summary, "teacher-vector")
    assert vec.info["hooks"] == [f"blocks.{i}.hook_resid_post" for i in range(12, 30)]
    data = stage_of(summary, "data")
    assert data.info["teacher"]["kind"] == "prompt"
    assert "owl" in data.info["teacher"]["system_prompt"].lower()
    assert data.info["n_prompts"] == 8
    fit = stage_of(summary, "fit")
    vs = VectorSet.load(fit.path / "vectors.safetensors")
    assert len(vs) == 3 * 30 and {h.split(".", 2)[2] for h in vs} == {
        "attn.hook_q",
        "attn.hook_k",
        "attn.hook_v",
    }
    assert fit.info["steps"] == 2
    assert [r["name"] for r in summary.results] == [
        "base",
        "teacher (system prompt)",
        "qkv-biases-s0",
    ]


TWO_FITS = """
name = "two-fits"
[teacher]
kind = "prompt"
animal = "owl"
[task]
n_prompts = 8
batch_size = 8
max_new_tokens = 16
topk_logprobs = 5
[[fits]]
name = "a"
hooks = "blocks.24.hook_resid_post"
objective = "distill"
lr = 0.05
max_steps = 2
batch_size = 4
[[fits]]
name = "b"
hooks = "blocks.20.hook_resid_post"
objective = "sft"
lr = 0.05
max_steps = 2
batch_size = 4
[eval]
n_questions = 2
[read]
lens_texts = 0
"""


def test_changing_one_fit_setting_reruns_only_that_fit_and_what_reads_it(tmp_path, tiny_models):
    """The README's claim: changing a fit setting re-runs only that fit (and the eval and read
    stages that read it); the data, the other fit and the old fit's folder stay as they are.
    Catches a stage key that depends on more than its own inputs (everything re-runs) or on
    less (the changed fit is reused)."""
    raw = {**parse_raw(TWO_FITS), "model": str(tiny_models[0])}
    first = run_experiment(parse_config(raw, "two-fits"), tmp_path)
    assert not any(s.cached for s in first.stages.values())
    mtimes = {s.name: (s.path / "stage.json").stat().st_mtime_ns for s in first.stages.values()}
    raw["fits"][1]["lr"] = 0.01
    second = run_experiment(parse_config(raw, "two-fits"), tmp_path)
    cached = {s.name: s.cached for s in second.stages.values()}
    assert cached == {
        "data-main": True,
        "fit-a-s0": True,
        "fit-b-s0": False,
        "eval": False,
        "read": False,
    }
    for name in ("data-main", "fit-a-s0"):
        assert second.stages[name].path == first.stages[name].path
        assert (second.stages[name].path / "stage.json").stat().st_mtime_ns == mtimes[name]
    for name in ("fit-b-s0", "eval", "read"):
        assert second.stages[name].key != first.stages[name].key
        assert first.stages[name].path.is_dir()  # the earlier result stays as a cache
    fit_b = read_json(second.stages["fit-b-s0"].path / "stage.json")
    assert fit_b["depends_on"]["fit"]["lr"] == 0.01
    # the run folder's index lists the current stages only
    assert read_json(tmp_path / "two-fits" / "stages.json")["stages"] == [
        s.path.name for s in second.stages.values()
    ]
    # and a third run with the same settings computes nothing
    third = run_experiment(parse_config(raw, "two-fits"), tmp_path)
    assert all(s.cached for s in third.stages.values())


def test_stage_json_records_kind_tag_key_and_provenance(tmp_path, tiny_models):
    """Every stage folder's stage.json (README: "kind, name, inputs, summary and provenance")
    holds real values: the folder's own key, the model folder and its weights hash, the
    stage's config and seed, the package version, and the dtype (asked for, picked, why).
    Catches a stage that records no provenance (the eval stage did not), a key that is not
    the folder's, and a key without the model's dtype (a float32 run would then reuse the
    bfloat16 run's stages)."""
    raw = {**parse_raw(TWO_FITS), "model": str(tiny_models[0])}
    raw["fits"] = raw["fits"][:1]
    summary = run_experiment(parse_config(raw, "x"), tmp_path)
    lm = load_model(tiny_models[0])
    expected = {
        "data-main": ("data", "main"),
        "fit-a-s0": ("fit", "a-s0"),
        "eval": ("eval", None),
        "read": ("read", None),
    }
    assert {s.name for s in summary.stages.values()} == set(expected)
    for s in summary.stages.values():
        meta = read_json(s.path / "stage.json")
        assert (meta["stage"], meta["kind"], meta["tag"]) == (s.name, *expected[s.name])
        assert s.path.name == f"{s.name}-{meta['key']}" and len(meta["key"]) == 12
        prov = meta["provenance"]
        assert prov["steerdiff_version"] == steerdiff.__version__
        assert prov["model_id"] == str(tiny_models[0])
        assert prov["weights_hash"] == lm.weights_hash
        assert prov["model_type"] == "llama" and prov["dtype"] == lm.provenance()["dtype"]
        assert (prov["dtype_requested"], prov["dtype_reason"]) == ("auto", lm.dtype_reason)
        assert meta["seconds"] == round(s.seconds, 2)
        assert meta["info"] == json.loads(json.dumps(s.info))  # what the stage returned
    data = read_json(summary.stages["data-main"].path / "stage.json")
    assert data["provenance"]["seed"] == 42 and data["provenance"]["config"]["n_prompts"] == 8
    assert data["depends_on"]["model"]["weights_hash"] == lm.weights_hash
    assert data["depends_on"]["model"]["dtype"] == str(lm.model.dtype)
    assert data["depends_on"]["teacher"]["kind"] == "prompt"
    assert data["info"]["n_prompts"] == 8
    fit = read_json(summary.stages["fit-a-s0"].path / "stage.json")
    assert fit["provenance"]["config"]["lr"] == 0.05 and fit["provenance"]["seed"] == 0
    assert fit["provenance"]["config"]["hooks"] == ["blocks.24.hook_resid_post"]
    assert fit["depends_on"]["data"] == summary.stages["data-main"].key
    assert fit["info"]["steps"] == 2
    ev = read_json(summary.stages["eval"].path / "stage.json")
    assert ev["provenance"]["config"] == {"scorer": "exact", "n_questions": 2, "n_samples": 20}
    assert ev["depends_on"]["fits"] == [summary.stages["fit-a-s0"].key]
    # the other dtype is another run: no stage of the first is reused (no shared cache)
    other = "float32" if lm.model.dtype == torch.bfloat16 else "bfloat16"
    again = run_experiment(parse_config({**raw, "dtype": other}, "x"), tmp_path)
    assert not any(s.cached for s in again.stages.values())
    first_keys = {s.key for s in summary.stages.values()}
    assert first_keys.isdisjoint(s.key for s in again.stages.values())
    prov = read_json(again.stages["fit-a-s0"].path / "stage.json")["provenance"]
    assert (prov["dtype"], prov["dtype_requested"]) == (other, other)


def parse_raw(toml_text: str) -> dict:
    return tomllib.loads(toml_text)


def test_yaml_experiment_is_the_same_experiment_as_toml(tmp_path):
    """The README: experiment files are TOML or YAML. The same experiment written by hand in
    both gives the same config (and so the same stage keys). Catches a YAML reader that
    drops or mistypes a field (e.g. a hook pattern list read as one string)."""
    toml = tmp_path / "e.toml"
    toml.write_text(
        'name = "e"\nmodel = "default"\n[teacher]\nkind = "steered"\ncoeff = 2.5\n'
        '[task]\nn_prompts = 12\n[[fits]]\nname = "v"\n'
        'hooks = ["blocks.3.hook_resid_post", "blocks.*.attn.hook_{q,k}"]\n'
        "lr = 0.05\nseeds = [0, 1]\nbetas = [0.8, 0.9]\n"
        '[[baselines]]\nkind = "lora"\n[baselines.lora]\nrank = 2\n'
    )
    yml = tmp_path / "e.yaml"
    yml.write_text(
        "name: e\nmodel: default\nteacher:\n  kind: steered\n  coeff: 2.5\ntask:\n  n_prompts: 12\n"
        "fits:\n  - name: v\n    hooks:\n      - blocks.3.hook_resid_post\n"
        "      - 'blocks.*.attn.hook_{q,k}'\n    lr: 0.05\n    seeds: [0, 1]\n    betas: [0.8, 0.9]\n"
        "baselines:\n  - kind: lora\n    lora: {rank: 2}\n"
    )
    a, b = load_config(toml), load_config(yml)
    assert a.model_dump() == b.model_dump()
    assert b.fits[0].hooks == ["blocks.3.hook_resid_post", "blocks.*.attn.hook_{q,k}"]
    assert b.fits[0].betas == (0.8, 0.9) and b.baselines[0].lora.r == 2 and b.task.n_prompts == 12
    assert b.source == str(yml)
    # an empty YAML file is an experiment without a name: one line naming the field
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    with pytest.raises(
        steerdiff.errors.SteerdiffError,
        match=r"empty.yml is not a valid "
        r"experiment: name: Field required$",
    ):
        load_config(empty)
