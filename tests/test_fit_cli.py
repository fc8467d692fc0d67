"""`steerdiff fit` from the command line: an earlier fit in --out is never lost, --resume
refuses other settings and, after an interruption, reaches the vectors of an uninterrupted
fit, a NaN loss stops in one line keeping the last good checkpoint, bad rows are one line,
and `--baseline lora` writes an adapter whose figures a user can check by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _chat_tiny import make_tiny_chat
from test_fit_data import OWL, number_rows, write_dataset
from typer.testing import CliRunner

import steerdiff.fit.loop as loop_module
import steerdiff.models as models
from steerdiff.cli import app
from steerdiff.fit import Example, FitConfig, split_examples
from steerdiff.fit.loop import batch_of_step, fixed_batches
from steerdiff.io import read_jsonl
from steerdiff.vectors import VectorSet

torch.set_num_threads(1)
runner = CliRunner()
HOOK = "blocks.1.hook_resid_post"
# the fit every test runs: 24 rows -> 20 train / 4 validation, 5 steps of 4 per epoch
# (lr in absolute units, 1 epoch, no convergence stop: the defaults before issue 18, pinned)
FIT = ["--hooks", HOOK, "--batch-size", "4", "--val-size", "4", "--lr", "0.05",
       "--lr-units", "absolute", "--epochs", "1", "--converge-tol", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def chat(smollm):
    return make_tiny_chat(smollm.tokenizer)


@pytest.fixture
def cli(chat, monkeypatch, tmp_path):
    """Run `steerdiff fit --data DATA ...` on the tiny chat model; DATA has 24 rows with
    top-k log-probs and an owl-prompt teacher in its manifest."""
    monkeypatch.setattr(models, "load_model", lambda *a, **k: chat)
    data = tmp_path / "d.jsonl"
    write_dataset(data, number_rows(chat.tokenizer, 24), teacher=OWL)

    def run(*args: str, data_path=data):
        return runner.invoke(app, ["fit", "--data", str(data_path), *args])

    run.data = data
    return run


def files_of(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def one_error_line(output: str) -> str:
    lines = output.strip().splitlines()  # stdout: progress lines go to stderr
    assert len(lines) == 1, output
    assert lines[0].startswith("error: ")
    return lines[0]


def test_an_earlier_fit_in_out_is_never_replaced_silently(cli, tmp_path):
    """Bugs caught: `fit` into a folder holding a fit silently replaced its vectors and
    metrics; `--resume` with other hooks died in a KeyError traceback. Both are one line
    (exit 2) and every file stays byte for byte; --overwrite replaces them. The summary
    names the objective, the validation rows and tokens, and flags a CE gap within noise."""
    out = tmp_path / "o"
    FIT_D = [*FIT, "--objective", "distill"]  # auto is online with this prompt teacher now
    r = cli(*FIT_D, "--steps", "3", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "objective: distill" in r.output
    result = json.loads((out / "result.json").read_text())
    assert (result["n_val_rows"], result["objective"]) == (4, "distill")
    assert f"on 4 validation rows ({result['n_val_tokens']:,} tokens)" in r.output
    assert result["ce_gap"] == pytest.approx(result["base_val_loss"] - result["teacher_val_loss"])
    before = files_of(out)
    assert {"vectors.safetensors", "result.json", "metrics.jsonl", "checkpoint.pt"} <= set(before)

    r = cli(*FIT_D, "--steps", "3", "--out", str(out))
    assert r.exit_code == 2
    assert one_error_line(r.stdout) == (
        f"error: {out} already holds a fit (vectors.safetensors, result.json, metrics.jsonl, "
        "metrics.csv, checkpoint.pt, config.json); use --overwrite to replace it, --resume to "
        "continue it from its checkpoint, or another --out."
    )
    r = cli(*FIT_D, "--steps", "3", "--out", str(out), "--hooks", "blocks.2.hook_resid_post",
            "--resume")  # fmt: skip
    assert r.exit_code == 2
    line = one_error_line(r.stdout)
    assert line.startswith(f"error: Cannot resume from {out / 'checkpoint.pt'}: this fit's ")
    assert (
        'hooks: ["blocks.1.hook_resid_post"] -> ["blocks.1.hook_resid_post", '
        '"blocks.2.hook_resid_post"]' in line
    )
    r = cli(*FIT_D, "--steps", "3", "--out", str(out), "--lr", "0.5", "--resume")
    assert r.exit_code == 2 and "lr: 0.05 -> 0.5" in one_error_line(r.stdout)
    assert files_of(out) == before

    r = cli(*FIT_D, "--steps", "3", "--out", str(out), "--lr", "0.5", "--overwrite")
    assert r.exit_code == 0, r.output
    new = VectorSet.load(out / "vectors.safetensors")[HOOK]
    old_path = tmp_path / "old.safetensors"
    old_path.write_bytes(before["vectors.safetensors"])
    assert not torch.allclose(new, VectorSet.load(old_path)[HOOK])
    assert json.loads((out / "result.json").read_text())["provenance"]["config"]["lr"] == 0.5


def test_resume_after_an_interruption_gives_the_uninterrupted_vectors(cli, tmp_path, monkeypatch):
    """Bug caught: `fit --resume` restarting, repeating or skipping steps (or its metrics
    file keeping the rows of steps after the checkpoint). 2 epochs = 10 steps, checkpoint
    every 2; the first run is stopped (Ctrl-C) right after step 5's metrics row, so it
    resumes from step 4's checkpoint and redoes step 5."""
    args = [*FIT, "--epochs", "2", "--checkpoint-every", "2", "--no-progress"]
    r = cli(*args, "--out", str(tmp_path / "whole"))
    assert r.exit_code == 0, r.output

    real_append = loop_module.append_jsonl

    def append_then_stop(path, rows):
        real_append(path, rows)
        if rows and rows[-1].get("step") == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "append_jsonl", append_then_stop)
    out = tmp_path / "cut"
    r = cli(*args, "--out", str(out))
    assert r.exit_code != 0 and not (out / "vectors.safetensors").exists()
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    monkeypatch.setattr(loop_module, "append_jsonl", real_append)

    r = cli(*args, "--out", str(out), "--resume")
    assert r.exit_code == 0, r.output
    whole = VectorSet.load(tmp_path / "whole" / "vectors.safetensors")[HOOK]
    resumed = VectorSet.load(out / "vectors.safetensors")[HOOK]
    torch.testing.assert_close(resumed, whole, atol=1e-6, rtol=1e-5)
    assert float(whole.norm()) > 0.05  # the fit moved: equal vectors are not two zeros
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == list(range(1, 11))
    a, b = (json.loads((d / "result.json").read_text()) for d in (tmp_path / "whole", out))
    assert b["fitted_val_loss"] == pytest.approx(a["fitted_val_loss"], rel=1e-6)


def test_a_nan_loss_stops_in_one_line_and_keeps_the_last_good_checkpoint(cli, chat, tmp_path):
    """Bug caught: a NaN loss that is stepped on (NaN vectors saved), a checkpoint written
    after it, or a traceback. The training rows of step 3 carry NaN top-k log-probs: exit 2,
    one line naming the step and the kept checkpoint (step 2), which holds exactly the
    vectors of a clean fit stopped at step 2; no vectors or result are written."""
    rows = number_rows(chat.tokenizer, 24)
    cfg = FitConfig(batch_size=4, val_size=4)
    placeholders = [Example([0], [0], id=r["id"]) for r in rows]  # same split and order
    train, _ = split_examples(placeholders, cfg)
    batches = fixed_batches(train, cfg)
    poisoned = {ex.id for ex in batches[batch_of_step(2, len(batches), cfg.seed)[1]]}
    for r in rows:
        if r["id"] in poisoned:
            r["topk_logprobs"] = [[math.nan] * 4 for _ in r["topk_logprobs"]]
    bad = tmp_path / "nan.jsonl"
    write_dataset(bad, rows)
    args = [*FIT, "--schedule", "constant", "--warmup-steps", "0", "--no-progress"]
    args += ["--objective", "distill"]  # trains on the top-k (auto: online, prompt teacher)
    out = tmp_path / "o"
    r = cli(*args, "--checkpoint-every", "2", "--out", str(out), data_path=bad)
    assert r.exit_code == 2
    line = one_error_line(r.stdout)
    assert line.startswith("error: Non-finite loss at step 3 (loss=nan")
    assert f"The last good checkpoint (step 2) is kept at {out / 'checkpoint.pt'}." in line
    assert not (out / "vectors.safetensors").exists() and not (out / "result.json").exists()
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["state"]["step"] == 2 and torch.isfinite(ck["params"][HOOK]).all()
    r = cli(*args, "--steps", "2", "--out", str(tmp_path / "clean"))
    assert r.exit_code == 0, r.output
    clean = VectorSet.load(tmp_path / "clean" / "vectors.safetensors")[HOOK]
    torch.testing.assert_close(ck["params"][HOOK], clean, atol=0, rtol=0)


def test_a_bad_row_is_one_line_and_nothing_is_written(cli, chat, tmp_path):
    """A row without assistant content, through the CLI: exit 2, one line naming the file
    and line, and no output folder made."""
    rows = number_rows(chat.tokenizer, 6)
    del rows[3]["messages"][1]["content"]
    path = tmp_path / "bad.jsonl"
    write_dataset(path, rows)
    r = cli(*FIT, "--out", str(tmp_path / "o"), data_path=path)
    assert r.exit_code == 2
    assert one_error_line(r.stdout).startswith(
        f"error: {path} line 4: the assistant message has no 'content'; each row needs"
    )
    assert not (tmp_path / "o").exists()


def test_threads_option_sets_torch_threads(cli, tmp_path):
    r = cli(*FIT, "--steps", "1", "--threads", "2", "--out", str(tmp_path / "o"))
    try:
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_baseline_lora_from_the_cli(cli, chat, tmp_path):
    """`fit --baseline lora` (a README command) writes a PEFT adapter folder; loaded back,
    its validation cross-entropy computed by hand (a plain forward per held-out row) is the
    fitted_val_loss result.json reports, and it differs from the base model's."""
    from test_train import hand_ce

    from steerdiff.fit import prepare_examples
    from steerdiff.teachers import load_adapted

    out = tmp_path / "lora"
    r = cli("--baseline", "lora", "--lora-r", "2", "--batch-size", "4", "--val-size", "4",
            "--lr", "0.01", "--steps", "3", "--out", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert {"adapter_config.json", "adapter_model.safetensors", "adapter.safetensors"} <= set(
        files_of(out)
    )
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 3 and result["provenance"]["lora"]["r"] == 2
    _, val = split_examples(prepare_examples(chat, cli.data).examples, FitConfig(val_size=4))
    tuned = load_adapted(out, chat)
    fitted = hand_ce(tuned.model, val)[0]
    base = hand_ce(chat.model, val)[0]
    assert result["fitted_val_loss"] == pytest.approx(fitted, rel=1e-4)
    assert result["base_val_loss"] == pytest.approx(base, rel=1e-4)
    assert abs(fitted - base) > 1e-3
