"""Monitoring by projection: per-token values, chat masks, flags, errors."""

from __future__ import annotations

import json

import pytest
import torch
from _read_helpers import ByteTok

from steerdiff.hooks import record
from steerdiff.interpret.monitor import MonitorError, project, save_monitor
from steerdiff.vectors import VectorSet, VectorSetError

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture
def lm(tiny_lm):
    tiny_lm.tokenizer = ByteTok()
    return tiny_lm


def test_projection_per_token_equals_hand(lm):
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    texts = ["hello world", "ab", "a longer text with more tokens"]
    res = project(lm, v, texts, hook=HOOK, skip_first=1)
    unit = v / v.norm()
    for i, t in enumerate(texts):
        x = torch.tensor([lm.tokenizer(t)["input_ids"]])
        with torch.no_grad(), record(lm.model, HOOK) as r:
            lm.model(x)
        want = (r[HOOK][0] @ unit).tolist()
        it = res.items[i]
        assert len(it.values) == len(t)
        assert it.values == pytest.approx(want, abs=1e-4)
        assert it.mean == pytest.approx(sum(want[1:]) / (len(want) - 1), abs=1e-4)
        assert it.max == pytest.approx(max(want[1:]), abs=1e-4)


def test_chat_rows_count_assistant_tokens_only(lm):
    v = torch.randn(64)
    rows = [
        {
            "messages": [
                {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "12, 34"},
            ]
        }
    ]
    res = project(lm, v, rows, hook=HOOK)
    it = res.items[0]
    # no chat template: chat.py's one fallback (the byte tokenizer adds no special tokens)
    rendered = "User: hi there\nAssistant: 12, 34\n"
    assert "".join(it.tokens) == rendered
    assert sum(it.counted) == len("12, 34")
    assert all(c for c in it.counted[-7:-1]) and not any(it.counted[:-7]) and not it.counted[-1]


def test_flags_the_row_that_pushes_toward_the_vector(lm, tmp_path):
    rows = [
        "the cat sat on the mat",
        "a dog ran far",
        "qqqqqqqqqqqqqq",
        "hello world again",
        "numbers 1 2 3",
        "plain text here",
        "another sentence",
        "some more words",
        "last one",
        "ok",
    ]
    acts = []
    for t in rows:
        x = torch.tensor([lm.tokenizer(t)["input_ids"]])
        with torch.no_grad(), record(lm.model, HOOK) as r:
            lm.model(x)
        acts.append(r[HOOK][0, 1:].mean(0))
    v = acts[2] - torch.stack(acts).mean(0)  # the "trait" direction of row 2
    vs = VectorSet.for_model(lm, {HOOK: v})
    res = project(lm, vs, rows, flag_z=2.0)
    assert res.flagged == [2]
    assert max(res.items, key=lambda t: t.z).index == 2
    # against a baseline of neutral rows the z-scores change but row 2 stays on top
    res_b = project(lm, vs, rows, baseline=rows[:2] + rows[3:], flag_z=2.0)
    assert 2 in res_b.flagged
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    res_f = project(lm, vs, str(p))
    assert res_f.flagged == [2]
    paths = save_monitor(tmp_path / "out", res_f, lm)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["json"].read_text())["flagged"] == [2]


def test_bad_inputs(lm):
    with pytest.raises(MonitorError, match="zero"):
        project(lm, torch.zeros(64), ["abc"], hook=HOOK)
    with pytest.raises(VectorSetError, match="width"):
        project(lm, torch.randn(32), ["abc"], hook=HOOK)
    with pytest.raises(MonitorError, match="No rows"):
        project(lm, torch.randn(64), [], hook=HOOK)
    other = VectorSet({HOOK: torch.randn(32)}, {"d_model": 32})
    with pytest.raises(VectorSetError, match="d_model"):
        project(lm, other, ["abc"])


def test_cli_read_monitor_flags_the_row_and_writes_the_projections(tmp_path):
    """Bug caught: `steerdiff read monitor` (a README command) ignoring --hook, --flag-z or
    --baseline, or writing values that are not the per-token projections on the vector."""
    from _read_helpers import tiny_model_folder
    from typer.testing import CliRunner

    from steerdiff.cli import app
    from steerdiff.models import load_model

    folder = tiny_model_folder(tmp_path / "m")
    lm = load_model(str(folder))
    rows = ["the cat sat on the mat", "a dog ran far", "qqqqqqqqqqqqqq", "hello world again"]
    rows += ["numbers 1 2 3", "plain text here", "another sentence", "some more words"]
    acts = []
    for t in rows:
        x = torch.tensor([lm.tokenizer(t)["input_ids"]])
        with torch.no_grad(), record(lm.model, HOOK) as r:
            lm.model(x)
        acts.append(r[HOOK][0].float())  # as the monitor reads them: float32 (the model: auto)
    v = acts[2][1:].mean(0) - torch.stack([a[1:].mean(0) for a in acts]).mean(0)
    other = "blocks.2.hook_resid_post"  # a second hook: --hook must pick HOOK
    vpath = VectorSet({HOOK: v, other: -v}, {"d_model": 64}).save(tmp_path / "v.safetensors")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    (tmp_path / "base.txt").write_text("\n".join(rows[:2] + rows[3:]) + "\n")
    out = tmp_path / "o"
    args = ["read", "monitor", str(vpath), str(data), "--model", str(folder), "--hook", HOOK]
    args += ["--baseline", str(tmp_path / "base.txt"), "--flag-z", "2.5", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    d = json.loads((out / "monitor.json").read_text())
    assert d["hook"] == HOOK and d["flag_z"] == 2.5 and d["flagged"] == [2]
    unit = v / v.norm()
    for i in (0, 2):
        want = (acts[i] @ unit).tolist()
        assert d["tokens"][i]["index"] == i
        assert d["tokens"][i]["values"] == pytest.approx(want, abs=1e-4)
    # the baseline (rows without row 2) sets the reference: mean/sd of its rows' means
    base_means = torch.tensor([float((a[1:] @ unit).mean()) for j, a in enumerate(acts) if j != 2])
    assert d["reference_mean"] == pytest.approx(float(base_means.mean()), abs=1e-4)
    assert d["reference_std"] == pytest.approx(float(base_means.std()), abs=1e-4)
    z2 = (float((acts[2][1:] @ unit).mean()) - float(base_means.mean())) / float(base_means.std())
    assert d["summary"][2]["z"] == pytest.approx(z2, rel=1e-3) and z2 > 2.5
    assert "flagged 1: [2]" in " ".join(r.stdout.split())
    csv_rows = (out / "monitor.csv").read_text().splitlines()
    assert csv_rows[0] == "index,mean,max,z,flagged,n_tokens" and len(csv_rows) == 1 + len(rows)
    assert csv_rows[3].startswith("2,") and ",True," in csv_rows[3]
    assert (out / "monitor_strips.png").read_bytes()[:4] == b"\x89PNG"
