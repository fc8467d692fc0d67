"""The command line: help lists the commands; info describes a model; errors are one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from steerdiff.cli import app

runner = CliRunner()


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    assert "info" in res.output


def test_info_on_local_folder(tmp_path):
    from conftest import make_tiny
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = make_tiny("gemma3_text")
    model.save_pretrained(tmp_path / "m")
    vocab = {f"t{i}": i for i in range(256)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    )
    tok.save_pretrained(tmp_path / "m")
    res = runner.invoke(app, ["info", str(tmp_path / "m"), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output[res.output.index("{") :])
    assert d["family"] == "gemma" and d["n_layers"] == 3 and d["d_model"] == 64


def test_info_bad_path():
    res = runner.invoke(app, ["info", "./no/such/model.gguf"])
    assert res.exit_code == 2
    assert "not found" in res.output


@pytest.mark.slow
def test_info_default_json(smollm):
    res = runner.invoke(app, ["info", "default", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output[res.output.index("{") :])
    assert d["family"] == "llama" and d["n_layers"] == 30 and d["d_model"] == 576
    assert d["n_parameters"] == 134_515_008
    assert "blocks.29.attn.hook_q" in d["hook_points"] and len(d["hook_points"]) == 300
