"""End to end: an experiment file -> cached stages -> report; kill mid-stage and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steerdiff.fit import FitConfig
from steerdiff.io import read_jsonl
from steerdiff.pipeline import load_results
from steerdiff.pipeline.config import ConfigError, load_config, parse_config

TINY_EXPERIMENT = """
name = "tiny"
[teacher]
kind = "steered"
hook = "blocks.24.hook_resid_post"
coeff = 2.0
[task]
n_prompts = 8
max_new_tokens = 56
batch_size = 8
topk_logprobs = 5
[[fits]]
name = "vec"
hooks = "blocks.24.hook_resid_post"
objective = "distill"
lr = 0.05
epochs = 1
batch_size = 4
[[baselines]]
kind = "lora"
batch_size = 4
[baselines.lora]
r = 2
[eval]
n_questions = 2
[read]
lens_texts = 4
lens_seq_len = 16
"""


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "x"\n[task]\nn_prompt = 5\n[[fits]]\nname = "a"\nhooks = "h"\noptimizer = "lbfgs"\n'
    )
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "task.n_prompt: unknown field" in msg
    assert "fits.0.optimizer" in msg
    broken = tmp_path / "broken.toml"
    broken.write_text("name = [unclosed")
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(broken)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="name: .*plain folder name"):
        parse_config({"name": "../escape"})


def test_fit_section_is_a_fit_config(tmp_path):
    """A [[fits]] entry is validated by FitConfig itself when the file loads: a fractional
    epochs or a misspelt FitConfig key fails there, in one line naming the field."""
    for line, expected in (
        ("epochs = 1.5", "fits.0.epochs: Input should be a valid integer"),
        ("epochz = 2", "fits.0.epochz: unknown field"),
        ("lr = 0", "fits.0.lr: must be > 0"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(f'name = "x"\n[[fits]]\nname = "a"\nhooks = "h"\n{line}\n')
        with pytest.raises(ConfigError) as e:
            load_config(bad)
        assert expected in str(e.value) and "\n" not in str(e.value)
    # every FitConfig field is accepted with FitConfig's own type
    cfg = parse_config(
        {
            "name": "x",
            "fits": [{"name": "a", "hooks": "h", "schedule": "cosine", "max_norm": 2, "seed": 3}],
        }
    )
    fc = cfg.fits[0].fit_config(3)
    assert isinstance(fc, FitConfig) and fc.schedule == "cosine" and fc.max_norm == 2.0
    assert cfg.fits[0].seeds == [3] and fc.hooks == ["h"]
    with pytest.raises(ConfigError, match=r"baselines.0.lora.rnk: unknown field"):
        parse_config({"name": "x", "baselines": [{"kind": "lora", "lora": {"rnk": 4}}]})


def test_bad_fit_setting_fails_before_any_stage(tmp_path):
    exp = tmp_path / "bad.toml"
    exp.write_text(TINY_EXPERIMENT.replace("epochs = 1", "epochs = 1.5"))
    runs = tmp_path / "runs"
    proc = _run(exp, runs)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and "fits.0.epochs" in out, out[-3000:]
    assert not runs.exists()  # nothing ran: no run folder, no stage


def test_examples_validate():
    examples = sorted(Path(__file__).parents[1].joinpath("examples").glob("*.toml"))
    assert len(examples) >= 5
    demo = Path(__file__).parents[1] / "src" / "steerdiff" / "data" / "demo.toml"
    for path in [*examples, demo]:
        load_config(path)


def _run(exp: Path, runs: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "steerdiff.cli", "run", str(exp), "--runs-dir", str(runs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.slow
def test_run_killed_mid_generation_resumes(tmp_path):
    exp = tmp_path / "tiny.toml"
    exp.write_text(TINY_EXPERIMENT)
    runs = tmp_path / "runs"
    proc = _run(exp, runs)
    # wait until the teacher has written its first chunk of rows, then kill hard
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        part = list(runs.glob("tiny/data-main-*.partial/data.jsonl"))
        if part and part[0].stat().st_size > 0:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = _run(exp, runs).communicate(timeout=900)[0]
    assert "Finished" in out, out[-3000:]
    data = list(runs.glob("tiny/data-main-*[!l]/data.jsonl"))
    assert len(data) == 1 and not list(runs.glob("tiny/*.partial"))
    ids = [r["id"] for r in read_jsonl(data[0])]
    assert len(ids) == len(set(ids)) and len(ids) > 0
    assert (runs / "tiny" / "report.html").exists()
    # the LoRA baseline's folder loaded back as a model and was evaluated beside the rest
    roles = {r["name"]: r["role"] for r in load_results(runs / "tiny")}
    assert roles.get("baseline-lora") == "baseline", roles
    # a second run finds everything cached and does nothing
    again = _run(exp, runs).communicate(timeout=600)[0]
    assert again.count("(cached;") >= 5, again[-3000:]
