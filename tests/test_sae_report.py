"""report.sae (the SAE section of a report) and `steerdiff sae read` (the command): the
tables' rows, escaping of token strings, one-line errors, and the files a good run writes."""

from __future__ import annotations

import json
import re

import pytest
import torch
from _read_helpers import one_line_error, tiny_model_folder
from typer.testing import CliRunner

from steerdiff.cli import app
from steerdiff.interpret.sae_effects import LatentEffects
from steerdiff.models import load_model
from steerdiff.report.sae import sae_report, sae_section
from steerdiff.sae import SAE, save_sae
from steerdiff.vectors import VectorSet

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


def _data() -> dict:
    all_mean = torch.zeros(12)
    all_mean[7], all_mean[2], all_mean[4] = 0.9, -0.6, 0.25
    eff = LatentEffects(
        hook="blocks.1.hook_resid_post",
        first_k=2,
        pos_mean=torch.zeros(2, 12),
        all_mean=all_mean,
        base_all_mean=torch.full((12,), 0.125),
        n_tokens=40,
        n_texts=4,
        meta={"corpus": "test", "skip_first": 1},
    )
    dash = {
        "latent": 7,
        "snippets": [
            {"tokens": ["a", "<b>", "&c"], "pos": 1, "value": 2.5, "values": [0.1, 2.5, 0.0]}
        ],
        "dla_top": [{"token": "<i>owl", "token_id": 3, "score": 1.5}],
        "dla_bottom": [{"token": "cat", "token_id": 4, "score": -1.0}],
        "frac_active": 0.05,
        "mean_active": 1.25,
    }
    dec = {
        "of": "vector",
        "hook": "blocks.1.hook_resid_post",
        "norm": 3.0,
        "top": [{"latent": 7, "cosine": 0.875, "pullback_dec": 2.5, "pullback_enc": 1.0}],
    }
    sae = {"path": "x/<sae>", "format": "saelens", "hook": "blocks.1.hook_resid_post"}
    return {"sae": sae, "effects": eff.to_dict(), "dashboards": [dash], "decomposition": dec}


def test_section_has_the_table_rows_and_escapes_token_strings():
    """Bugs caught: token strings written into the page unescaped (a token "<b>" turning the
    rest of the snippet bold, "<i>owl" italic), the max token not marked, or the up/down
    tables swapped. Mutations tried: `_token` returning the raw token -> the "<b>" span
    check fails; effect_rows with up/down swapped -> the first up row names latent 2."""
    page = sae_section(_data())
    assert "<b>" not in page and "<i>" not in page and "x/<sae>" not in page
    assert "&lt;b&gt;" in page and "&amp;c" in page and "&lt;i&gt;owl" in page
    # the max-activating token is outlined and carries its value
    assert re.search(
        r'<span class="max" style="[^"]*outline[^"]*" title="2.5">&lt;b&gt;</span>', page
    )
    # decomposition row: rank 1, latent 7, cosine 0.875, rank 1 by effect
    assert "<td>1</td><td>7</td><td>0.875</td><td>2.5</td><td>1</td><td>1</td>" in page
    # first effects row: up latent 7 (+0.9), down latent 2 (-0.6), base means 0.125
    assert (
        "<td>1</td><td>7</td><td>0.9</td><td>0.125</td><td>2</td><td>-0.6</td><td>0.125</td>"
        in page
    )
    assert "Latent 7" in page and "active on 5.00% of tokens" in page
    assert page.count("<img") == 1  # the bar chart of the top changes
    html = sae_report(_data())
    assert html.sections[0].anchor == "sae"


def _setup(tmp_path, d_in=64):
    folder = tiny_model_folder(tmp_path / "model")
    lm = load_model(str(folder), dtype="float32")
    g = torch.Generator().manual_seed(0)
    sae = SAE(
        W_enc=torch.randn(d_in, 16, generator=g),
        b_enc=torch.zeros(16),
        W_dec=torch.randn(16, d_in, generator=g),
        b_dec=torch.zeros(d_in),
        hook="blocks.1.hook_resid_post",
    )
    save_sae(sae, tmp_path / "sae")
    vs = VectorSet.for_model(lm, {"blocks.1.hook_resid_post": torch.randn(64, generator=g)})
    vs.save(tmp_path / "v.safetensors")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["some text here", "owls hoot at night", "a b c d e f g"]))
    return folder, corpus


def test_cli_one_line_errors_and_a_good_run_writes_both_files(tmp_path):
    """Bugs caught: no change given (or two) running anyway, an SAE of another width
    failing with a traceback, files not written, or the vector at the SAE's hook not the
    one decomposed. Mutations tried: the `len(given) != 1` check removed -> a LensError
    still one line but naming vectors=, not --vectors (the match fails); decomposition_of
    always using the mean difference -> "of" is "mean activation difference"."""
    folder, corpus = _setup(tmp_path)
    base = ["sae", "read", str(tmp_path / "sae"), "--model", str(folder), "--corpus", str(corpus)]
    out = tmp_path / "out"
    res = runner.invoke(app, [*base, "--out", str(out)])
    assert "exactly one of --vectors" in one_line_error(res) and not out.exists()
    res = runner.invoke(
        app, [*base, "--out", str(out), "--vectors", "v", "--finetuned", str(folder)]
    )
    assert "got --vectors, --finetuned" in one_line_error(res)
    res = runner.invoke(app, [*base, "--out", str(out), "--adapter", str(tmp_path)])
    assert "--adapter" in one_line_error(res) and "adapter_config.json" in res.stdout
    # an SAE of another width
    other = tmp_path / "other"
    g = torch.Generator().manual_seed(1)
    save_sae(
        SAE(
            torch.randn(32, 8, generator=g),
            torch.zeros(8),
            torch.randn(8, 32, generator=g),
            torch.zeros(32),
            hook="blocks.1.hook_resid_post",
        ),
        other,
    )
    res = runner.invoke(
        app,
        [
            "sae",
            "read",
            str(other),
            "--model",
            str(folder),
            "--vectors",
            str(tmp_path / "v.safetensors"),
            "--out",
            str(out),
        ],
    )
    msg = one_line_error(res)
    assert "d_in=32" in msg and "64 wide" in msg and not out.exists()
    res = runner.invoke(
        app,
        [
            *base,
            "--vectors",
            str(tmp_path / "v.safetensors"),
            "--out",
            str(out),
            "--top",
            "3",
            "--dashboards",
            "2",
            "--tokens",
            "16",
            "--first-k",
            "2",
            "--n-texts",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads((out / "sae_read.json").read_text())
    assert data["decomposition"]["of"] == "vector" and len(data["effects_top"]["all"]["up"]) == 3
    assert data["effects"]["n_texts"] == 3 and data["provenance"]["steerdiff_version"]
    assert 2 <= len(data["dashboards"]) <= 4
    page = (out / "sae_read.html").read_text()
    assert "Latent effects on corpus text" in page and "Latent dashboards" in page
    assert "latent effects" in res.stdout
