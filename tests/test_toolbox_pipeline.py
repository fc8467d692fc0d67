"""The four steering-toolbox sections ([whiten], [melbo], [fuzz], [profile]) together in one
experiment file: each runs as its own stage after the fit, the report has a section for each,
and a rerun is cached. Each section's numbers are tested against the library in its own test
file (test_whiten_steer, test_melbo, test_fuzz, test_layer_profile); this one catches the
wiring: a section parsed but never run (mutation tried: `if cfg.melbo is not None:` -> `if
False:` in pipeline/run.py: the stage list lacks "melbo"), a stage whose report section is not
called (mutation tried: profile_sections removed from report/experiment.py: the section title
is missing), and a toolbox stage that ignores the run's fit (the fuzz pair names it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _pipeline_tiny import save_tiny
from test_pipeline_facts import stage_dir

from steerdiff.pipeline import parse_config, run_experiment

HOOK = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm) -> Path:
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", smollm, "llama", 3)


def test_all_four_toolbox_sections_run_and_are_reported(tmp_path, tiny_folder):
    rows = [
        {"messages": [{"role": "user", "content": f"Name a bird ({i})."},
                      {"role": "assistant", "content": f"An owl, number {i + 3}."}]}
        for i in range(12)
    ]  # fmt: skip
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    short = dict(objective="sft", max_steps=2, batch_size=4, max_len=48, val_fraction=0.25, lr=0.5)
    raw = {
        "name": "toolbox-tiny",
        "model": str(tiny_folder),
        "dtype": "float32",
        "task": {"name": "dataset", "data": str(data)},
        "fits": [{"name": "resid", "hooks": HOOK, **short}],
        "read": {"lens_texts": 0},
        "whiten": {"texts": 6, "eval_texts": 3, "max_tokens": 16, "shrinkage": 0.2},
        "melbo": {
            "source_hook": "blocks.0.hook_resid_post", "target_hook": HOOK, "n_vectors": 2,
            "radius": 2.0, "steps": 2, "n_prompts": 2, "max_tokens": 16,
            "evals": ["coherence"], "n_samples": 1, "sample_tokens": 3,
        },
        "fuzz": {"layers": [0], "scales": [0.0, 1.0], "seeds": 1, "n_questions": 2},
        "profile": {
            "layers": "all", "strengths": [-4.0, 4.0], "n_questions": 2, "ci_questions": 4,
            "n_contrast": 3, "n_neutral": 2, "kl_tokens": 3, "kl_bound": None,
        },
    }  # fmt: skip
    summary = run_experiment(parse_config(raw, source="toolbox (tiny)"), tmp_path / "runs")
    kinds = [s.kind for s in summary.stages.values()]
    assert kinds[-4:] == ["whiten", "melbo", "fuzz", "profile"]
    fz = json.loads((stage_dir(summary.run_dir, "fuzz") / "fuzz.json").read_text())
    assert [(c["a"], c["b"]) for c in fz["comparisons"]] == [("base", "resid-s0")]
    prof = json.loads((stage_dir(summary.run_dir, "profile") / "profile.json").read_text())
    assert [m["n_layers"] for m in prof["models"]] == [3]
    page = (summary.run_dir / "report.html").read_text()
    for title in (
        "Whitening: vectors in the data&#x27;s units",
        "MELBO: unsupervised steering vectors",
        "Activation fuzzing",
        "Layer profiles",
    ):
        assert title in page or title.replace("&#x27;", "'") in page, title
    again = run_experiment(parse_config(raw, source="toolbox (tiny)"), tmp_path / "runs")
    assert all(s.cached for s in again.stages.values())
