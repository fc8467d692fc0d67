"""Experiment files: validation (the schema when the file loads, everything that needs the
model before the first stage runs), one-line errors from `steerdiff run`, the demo's config,
failed stages that leave nothing misleading, and a real kill mid-generation that resumes
row for row."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import tomllib
import torch
from _pipeline_tiny import cli, save_tiny
from typer.testing import CliRunner

from steerdiff.cli import app
from steerdiff.cli.run import demo_config_path
from steerdiff.fit import FitConfig
from steerdiff.generate import manifest_path, progress_path
from steerdiff.io import read_jsonl
from steerdiff.pipeline import load_results, run_experiment
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
    assert msg.startswith(f"{bad} is not a valid experiment: ")
    assert "task.n_prompt: unknown field" in msg
    assert "fits.0.optimizer" in msg
    assert "\n" not in msg  # two bad fields, still one line (the CLI prints one line)
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
    proc = cli("run", str(exp), "--runs-dir", str(runs))
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, out[-3000:]
    assert error_line(out) == (
        f"error: {exp} is not a valid experiment: fits.0.epochs: Input should be a valid "
        "integer, got a number with a fractional part"
    )
    assert not runs.exists()  # nothing ran: no run folder, no stage


def test_examples_validate():
    examples = sorted(Path(__file__).parents[1].joinpath("examples").glob("*.toml"))
    assert len(examples) >= 5
    demo = Path(__file__).parents[1] / "src" / "steerdiff" / "data" / "demo.toml"
    for path in [*examples, demo]:
        load_config(path)


def error_line(out: str) -> str:
    """The one `error: ...` line of a command's output; fails on a traceback or two errors."""
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


# tiny models on a shared 2-core machine run ~5x faster on one thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm) -> Path:
    """A SmolLM2-shaped tiny llama (30 layers, SmolLM2's tokenizer) as a model folder."""
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-smollm", smollm, "llama", 30)


def test_run_with_a_missing_model_file_is_one_line_naming_the_key(tmp_path, tiny_model):
    """Bug: `steerdiff run` with `model = "./nope.gguf"` printed a traceback (or an error
    naming neither the experiment file nor its key) and left a run folder behind."""
    runs = tmp_path / "runs"
    for key, value, why in (
        ("model", "./nope.gguf", "GGUF file not found: nope.gguf. Check the path."),
        ("student_model", "./no-such-folder/", "No such file or folder: ./no-such-folder/"),
    ):
        exp = tmp_path / f"{key}.toml"
        teacher_model = f'model = "{tiny_model}"\n' if key == "student_model" else ""
        exp.write_text(f'name = "x"\n{teacher_model}{key} = "{value}"\n')
        if key == "model":  # the real command, in its own process
            proc = cli("run", str(exp), "--runs-dir", str(runs))
            out, code = proc.communicate(timeout=600)[0], proc.returncode
        else:  # the same command in this process (no start-up time)
            res = CliRunner().invoke(app, ["run", str(exp), "--runs-dir", str(runs)])
            out, code = res.stdout, res.exit_code  # (stderr holds the loading bars)
        assert code == 2, out[-3000:]
        assert error_line(out) == f"error: {exp}: {key} = {value!r}: {why}"
        assert not runs.exists()  # no run folder, no experiment.json


def test_run_with_a_bad_hook_fails_in_seconds_before_any_stage(tmp_path, tiny_model):
    """Bug: `hooks = "blocks.99.hook_resid_post"` on a 30-layer model was found only in the
    fit stage, after the teacher-vector and data stages had run (20 s and more), and left an
    empty fit-*.partial folder. It must fail right after the model loads, with one line
    naming the file and the key, and with nothing on disk."""
    exp = tmp_path / "hooks.toml"
    exp.write_text(
        f'name = "h"\nmodel = "{tiny_model}"\n[task]\nn_prompts = 64\n'
        '[[fits]]\nname = "v"\nhooks = "blocks.99.hook_resid_post"\n'
    )
    runs = tmp_path / "runs"
    t0 = time.perf_counter()
    proc = cli("run", str(exp), "--runs-dir", str(runs))
    out = proc.communicate(timeout=600)[0]
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2, out[-3000:]
    line = error_line(out)
    assert line.startswith(
        f"error: {exp}: fits.0.hooks = 'blocks.99.hook_resid_post': not a hook of the model "
        f"{str(tiny_model)!r}: "
    )
    assert "The model has 30 layers (0-29)." in line
    assert not runs.exists()  # no teacher-vector-*, data-* or fit-*.partial folder
    assert seconds < 60, seconds  # python start + imports + a tiny model load; no stage ran


def check_error(tmp_path: Path, raw: dict) -> str:
    """The ConfigError message of running `raw`; asserts that nothing was written."""
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError) as e:
        run_experiment(parse_config(raw, "exp.toml"), runs)
    assert not runs.exists()
    assert "\n" not in str(e.value)
    return str(e.value)


CHECKS = [
    (
        {"teacher": {"hook": "blocks.30.hook_resid_post"}},
        "exp.toml: teacher.hook = 'blocks.30.hook_resid_post': not a hook of the model ",
    ),
    (
        {"fits": [{"name": "p", "hooks": "blocks.3.hook_resid_post", "teacher": "prompt"}]},
        "exp.toml: fits.0.teacher = 'prompt': the experiment has no [prompt_teacher] to write "
        "that data: add one, or use teacher = 'main'.",
    ),
    (
        {
            "task": {"topk_logprobs": 0},
            "fits": [{"name": "d", "hooks": "blocks.3.hook_resid_post", "objective": "distill"}],
        },
        "exp.toml: fits.0.objective = 'distill': distillation needs the teacher's top-k "
        "log-probs: set task.topk_logprobs > 0 (e.g. 20), or use objective = 'sft'.",
    ),
    (
        {"task": {"n_prompts": 10}, "baselines": [{"kind": "lora", "val_size": 10}]},
        "exp.toml: baselines.0.val_size = 10: leaves no training rows of at most "
        "task.n_prompts = 10: lower val_size.",
    ),
    (
        {"teacher": {"animal": "dragon"}},
        "exp.toml: teacher.animal = 'dragon': the evaluation cannot score it: not among the "
        "animals candidates (",
    ),
    (
        {"teacher": {"vectors": "missing.safetensors"}},
        "exp.toml: teacher.vectors = 'missing.safetensors': VectorSet file not found: "
        "missing.safetensors",
    ),
    (
        {"teacher": {"kind": "adapter", "adapter": "no-adapter"}},
        "exp.toml: teacher.adapter = 'no-adapter': an adapter teacher needs the folder of a "
        "finetuned model or LoRA adapter; no such folder.",
    ),
]


@pytest.mark.parametrize(("update", "message"), CHECKS, ids=lambda x: str(x)[:40])
def test_settings_that_need_the_model_are_checked_before_any_stage(
    tmp_path, tiny_model, update, message
):
    """Each of these used to be found only when its stage ran (a prompt fit without a prompt
    teacher silently fitted the MAIN teacher's data instead); now the run stops before the
    first stage with one line naming the key, and writes nothing."""
    msg = check_error(tmp_path, {"name": "x", "model": str(tiny_model), **update})
    assert msg.startswith(message), msg


def test_distilling_a_student_of_another_tokenizer_is_refused(tmp_path, tiny_model):
    """The teacher's stored top-k log-probs index the teacher's vocabulary: a student with
    another tokenizer cannot be distilled on them (it would train on wrong ids)."""
    from _read_helpers import tiny_model_folder

    other = tiny_model_folder(tmp_path / "other", "llama")  # 3 layers, a byte tokenizer
    raw = {
        "name": "x",
        "model": str(tiny_model),
        "student_model": str(other),
        "fits": [{"name": "d", "hooks": "blocks.1.hook_resid_post", "objective": "distill"}],
    }
    assert check_error(tmp_path, raw) == (
        f"exp.toml: fits.0.objective = 'distill': the teacher's top-k log-probs are over the "
        f"vocabulary of {str(tiny_model)!r}, not that of the student model {str(other)!r}: use "
        "objective = 'sft' for a student of another tokenizer."
    )
    # the student's hooks are checked against the student (3 layers), not the teacher (30)
    raw["fits"] = [{"name": "s", "hooks": "blocks.5.hook_resid_post", "objective": "sft"}]
    assert check_error(tmp_path, raw).startswith(
        f"exp.toml: fits.0.hooks = 'blocks.5.hook_resid_post': not a hook of the student model "
        f"{str(other)!r}: "
    )


def test_a_fit_that_fails_leaves_no_partial_folder(tmp_path, tiny_model, monkeypatch):
    """A stage that fails before it has anything to resume from must not leave an empty
    `fit-*.partial` folder that looks like progress; the finished stages before it stay."""
    import steerdiff.fit
    from steerdiff.fit import FitError

    def failing_fit(*args, out_dir, **kwargs):
        (out_dir / "config.json").write_text("{}")  # fit writes this first, then fails
        raise FitError("the data has one row")

    monkeypatch.setattr(steerdiff.fit, "fit", failing_fit)
    raw = {
        "name": "x",
        "model": str(tiny_model),
        "teacher": {"kind": "prompt"},
        "task": {"n_prompts": 4, "max_new_tokens": 8},
        "fits": [{"name": "v", "hooks": "blocks.3.hook_resid_post"}],
    }
    with pytest.raises(FitError, match="the data has one row"):
        run_experiment(parse_config(raw, "x.toml"), tmp_path)
    folders = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "x").iterdir() if p.is_dir())
    assert folders == ["data-main"]  # finished; no fit-v-s0-*.partial beside it


def test_demo_print_config_prints_the_demo_experiment():
    """`steerdiff demo --print-config` shows the experiment the demo runs: what it prints
    parses back into the same experiment (so it can be saved, edited and run)."""
    res = CliRunner().invoke(app, ["demo", "--print-config"])
    assert res.exit_code == 0, res.output
    printed = parse_config(tomllib.loads(res.output), "printed")
    demo = load_config(demo_config_path())
    assert printed.model_dump() == demo.model_dump()
    assert printed.name == "demo" and [f.name for f in printed.fits] == [
        "vector-at-steered-hook",
        "qkv-biases-prompted",
    ]


KILL_EXPERIMENT = """
name = "kill"
model = "{model}"
[teacher]
kind = "prompt"
[task]
n_prompts = 96
max_new_tokens = 16
batch_size = 8
topk_logprobs = 5
[eval]
n_questions = 1
[read]
lens_texts = 0
"""


def chunks_done(run: Path) -> int:
    """Chunks the data stage's progress file records (0 before it starts)."""
    prog = [progress_path(p / "data.jsonl") for p in run.glob("data-main-*.partial")]
    if not prog or not prog[0].exists():
        return 0
    # read while the run appends: count complete lines only (the last may be half written)
    lines = prog[0].read_text().split("\n")[:-1]
    return sum(1 for line in lines if line.startswith('{"chunk"'))


def test_run_killed_mid_generation_resumes_row_for_row(tmp_path, tiny_model):
    """A real `steerdiff run` killed with SIGKILL while the data stage is between chunks
    (1 or 2 of its 3 chunks of 32 prompts written) resumes to the same dataset, row for
    row, as an uninterrupted run of the same experiment. Catches a resume that skips,
    repeats or reorders a chunk (the old test's single chunk could not)."""
    exp = tmp_path / "kill.toml"
    exp.write_text(KILL_EXPERIMENT.format(model=tiny_model))
    env = {"OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = cli("run", str(exp), "--runs-dir", str(killed), env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and chunks_done(killed / "kill") < 1:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = chunks_done(killed / "kill")
    assert done in (1, 2), f"the kill must land mid-generation; {done} chunks were done"
    assert not list(killed.glob("kill/data-main-*[!l]/stage.json"))  # the stage had not finished
    run_experiment(load_config(exp), killed)  # resume (in this process: no start-up time)
    fresh = tmp_path / "fresh"
    run_experiment(load_config(exp), fresh)
    (resumed,) = killed.glob("kill/data-main-*[!l]/data.jsonl")
    (uninterrupted,) = fresh.glob("kill/data-main-*[!l]/data.jsonl")
    assert resumed.parent.name == uninterrupted.parent.name  # same stage key
    a, b = list(read_jsonl(resumed)), list(read_jsonl(uninterrupted))
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) > 64  # > 2 chunks of rows
    for x, y in zip(a, b, strict=True):
        assert x == y, (x["id"], y["id"])
    assert manifest_path(resumed).exists() and not list(killed.glob("kill/*.partial"))
    assert [r["name"] for r in load_results(killed / "kill")] == ["base", "teacher (system prompt)"]


def test_run_threads_option_sets_torch_threads(tmp_path, tiny_model):
    """`steerdiff run --threads N` (1 is fastest on a busy CPU) must reach torch; an option
    that is parsed and then ignored would leave torch's default."""
    exp = tmp_path / "hooks.toml"
    exp.write_text(f'name = "h"\nmodel = "{tiny_model}"\n[[fits]]\nname = "v"\nhooks = "x"\n')
    res = CliRunner().invoke(app, ["run", str(exp), "--threads", "3", "--runs-dir", str(tmp_path)])
    assert res.exit_code == 2 and "fits.0.hooks = 'x'" in res.stdout, res.output
    assert torch.get_num_threads() == 3  # (the one_thread fixture restores it)
