"""The batched sampler (greedy = model.generate, steering, constraints, top-k) and the
`steerdiff generate` command (--n-valid, --overwrite under kill -9, progress lines).
The dataset files themselves: test_dataset_files.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from transformers import AutoTokenizer

from steerdiff.generate import (
    SampleStats,
    load_dataset,
    manifest_path,
    partial_path,
    progress_path,
    sample,
)
from steerdiff.generate.prefix import common_prefix_len
from steerdiff.hooks import steer
from steerdiff.tasks.numbers import NumbersConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


PROMPTS = [
    [11, 12, 13, 14, 15],
    [21, 22, 23, 24, 25, 26, 27, 28, 29],
    [31, 32, 33],
    [41, 42, 43, 44],
]


def _hf_greedy(model, prompts, n, eos, pad=0):
    """model.generate on the same left-padded batch, cut after the first eos."""
    plen = max(map(len, prompts))
    ids = torch.full((len(prompts), plen), pad)
    am = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, plen - len(p) :] = torch.tensor(p)
        am[r, plen - len(p) :] = 1
    g = model.generate(
        input_ids=ids,
        attention_mask=am,
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=eos,
        pad_token_id=pad,
    )[:, plen:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in g]


def test_greedy_matches_generate_every_family(tiny):
    res = sample(tiny, PROMPTS, max_new_tokens=10, temperature=0, stop_ids=[5], pad_id=0)
    assert [s.token_ids for s in res] == _hf_greedy(tiny, PROMPTS, 10, eos=5)
    assert [s.index for s in res] == [0, 1, 2, 3]


def test_greedy_matches_generate_with_early_stops_and_small_batches():
    m = make_tiny("llama")
    ref = sample(m, PROMPTS, max_new_tokens=12, temperature=0, stop_ids=[], pad_id=0)
    eos = ref[2].token_ids[2]  # a token row 2 emits at step 3: rows stop at different steps
    hf = _hf_greedy(m, PROMPTS, 12, eos=eos)
    for bs, compact in ((4, True), (4, False), (3, True), (1, True)):
        res = sample(
            m, PROMPTS, 12, temperature=0, stop_ids=[eos], batch_size=bs, pad_id=0, compact=compact
        )
        assert [s.token_ids for s in res] == hf, (bs, compact)
    assert res[2].stopped and res[2].token_ids[-1] == eos


@pytest.mark.parametrize("positions", ["all", "response", "prompt", "first:3"])
def test_steered_greedy_matches_generate_under_the_same_steer(positions):
    m = make_tiny("qwen2")
    v = {
        "blocks.1.hook_resid_post": 4.0
        * torch.randn(64, generator=torch.Generator().manual_seed(1))
    }
    plain = sample(m, PROMPTS, 8, temperature=0, stop_ids=[], pad_id=0)
    with steer(m, v, positions=positions):
        ours = sample(m, PROMPTS, 8, temperature=0, stop_ids=[], pad_id=0)
        hf = _hf_greedy(m, PROMPTS, 8, eos=-1)
    assert [s.token_ids for s in ours] == hf
    assert [s.token_ids for s in ours] != [s.token_ids for s in plain]


def test_sampling_is_seeded_and_top_p_small_is_greedy():
    m = make_tiny("llama")
    a = sample(m, PROMPTS, 8, temperature=1.0, seed=3, stop_ids=[])
    b = sample(m, PROMPTS, 8, temperature=1.0, seed=3, stop_ids=[])
    c = sample(m, PROMPTS, 8, temperature=1.0, seed=4, stop_ids=[])
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]
    greedy = sample(m, PROMPTS, 8, temperature=0, stop_ids=[])
    nucleus = sample(m, PROMPTS, 8, temperature=1.0, top_p=1e-6, seed=5, stop_ids=[])
    assert [s.token_ids for s in nucleus] == [s.token_ids for s in greedy]


def test_constrained_sampling_follows_the_renormalised_distribution():
    """Bugs caught: constrained sampling that does not draw from the model's distribution
    renormalised over the allowed tokens (e.g. uniformly, from the full softmax, or
    ignoring the temperature), in either path: the restricted unembedding (topk 0) and
    the masked full logits (topk > 0); token counts miscounted in the stats."""
    m = make_tiny("gemma2")
    prompt, allowed, n = PROMPTS[1], [7, 8, 9, 100], 4000
    options = [3, 7, 8, 9, 100]  # the allowed tokens and the stop token
    with torch.no_grad():
        logits = m(torch.tensor([prompt])).logits[0, -1]  # [V]
    want = (logits[options] / 0.25).softmax(-1)  # [5]: 0.24 0.12 0.12 0.13 0.39
    for topk in (0, 4):
        st = SampleStats()
        res = sample(
            m,
            [prompt] * n,
            1,
            temperature=0.25,
            seed=topk,
            stop_ids=[3],
            allowed_ids=allowed,
            topk=topk,
            stats=st,
            batch_size=n,
        )
        first = torch.tensor([s.token_ids[0] for s in res])
        freq = torch.stack([(first == t).float().mean() for t in options])
        assert freq.sum().item() == pytest.approx(1.0)  # nothing outside the allowed set
        assert torch.allclose(freq, want, atol=0.035), (topk, freq, want)  # sd <= 0.008
        assert st.new_tokens == n and st.prompt_tokens == n * len(prompt)


def test_topk_under_constraint_is_the_unconstrained_distribution():
    """What docs/generate.md promises for `--constrained --topk K`: the unconstrained top-k
    (topk_*_unconstrained; topk_* now hold the constrained distribution's, see
    test_constraint_scoring.py) are the model's full-vocabulary log-probs at temperature 1,
    before the constraint and the temperature. Bugs caught: top-k taken after the
    constraint (ids from the allowed set only) or after the temperature."""
    m = make_tiny("llama")
    allowed = [7, 8, 9, 100]
    res = sample(m, PROMPTS, 6, temperature=0.5, seed=0, stop_ids=[], allowed_ids=allowed, topk=5)
    for p, s in zip(PROMPTS, res, strict=True):
        assert set(s.token_ids) <= set(allowed) and len(s.token_ids) == 6
        with torch.no_grad():
            logits = m(torch.tensor([p + s.token_ids])).logits[0].float()  # [len, V]
        lp = logits.log_softmax(-1)[len(p) - 1 : len(p) + 5]  # the 6 generating positions
        v, i = lp.topk(5, dim=-1)  # [6, 5]
        assert s.topk_ids_unconstrained == i.tolist()
        assert torch.allclose(torch.tensor(s.topk_logprobs_unconstrained), v, atol=1e-4)
    # greedy unconstrained: the chosen token is the top-1 of the stored distribution
    g = sample(m, PROMPTS, 6, temperature=0, stop_ids=[], topk=2)
    assert all(s.token_ids == [r[0] for r in s.topk_ids] for s in g)


def test_greedy_matches_generate_on_embedded_model(smollm):
    """Also with the chat template's common prefix shared (generate.prefix): bugs caught are
    those of test_prefix.py on the real model (positions, pads, the cache of 30 layers)."""
    tok = smollm.tokenizer
    users = ["Name a bird.", "Count to three: 1, 2,", "Say hello in French, briefly please."]
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": u}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for u in users
    ]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    st = SampleStats()
    ours = sample(smollm, prompts, 12, temperature=0, batch_size=3, stats=st)
    assert [s.token_ids for s in ours] == _hf_greedy(
        smollm.model, prompts, 12, eos, tok.pad_token_id
    )
    shared = common_prefix_len(prompts)  # the template and its default system prompt
    assert shared > 20 and st.shared_tokens == 3 * shared


def test_cli_errors_before_loading_anything(tmp_path):
    from typer.testing import CliRunner

    from steerdiff.cli import app

    blocker = tmp_path / "file"
    blocker.write_text("")
    r = CliRunner().invoke(
        app, ["generate", "--out", str(blocker / "d.jsonl"), "--teacher", "plain"]
    )
    assert r.exit_code == 2 and "Cannot write" in r.output
    r = CliRunner().invoke(
        app, ["generate", "--out", str(tmp_path / "d.jsonl"), "--teacher", "steered"]
    )
    assert r.exit_code == 2 and "needs --vectors" in r.output
    r = CliRunner().invoke(
        app, ["generate", "--out", str(tmp_path / "d.jsonl"), "--backend", "vllm"]
    )
    assert r.exit_code == 2 and "vLLM" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_bad_banned_numbers_list_is_one_line_before_loading(tmp_path, monkeypatch):
    """Bug caught: an unknown --banned-numbers entry found only after the model loaded, or
    reaching the user as a traceback (int("six"))."""
    from typer.testing import CliRunner

    import steerdiff.models as models
    from steerdiff.cli import app

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(models, "load_model", no_load)
    out = tmp_path / "d.jsonl"
    r = CliRunner().invoke(app, ["generate", "--out", str(out), "--banned-numbers", "666,six"])
    line = r.output.strip()
    assert r.exit_code == 2 and line.startswith("error:") and "\n" not in line
    assert "--banned-numbers: 'six' is neither a number nor a list name" in line
    assert list(tmp_path.iterdir()) == []


def test_grammar_keeps_every_row_a_valid_list():
    from steerdiff.tasks.numbers import NumberListGrammar, judge

    class Tok:
        TEXT = {7: "1", 8: "2", 9: ", ", 100: ";", 101: " "}

        def decode(self, ids):
            return self.TEXT[ids[0]]

    m = make_tiny("llama")
    g = NumberListGrammar(Tok(), [3])
    res = sample(
        m, PROMPTS * 4, 40, seed=1, stop_ids=[3], allowed_ids=[7, 8, 9, 100, 101], grammar=g
    )
    texts = ["".join(Tok.TEXT[t] for t in s.token_ids if t != 3) for s in res]
    assert all(judge(t, s.stopped).ok for t, s in zip(texts, res, strict=True) if s.stopped)
    assert all(g.prefix_ok(t) for t in texts)  # the truncated rows too
    assert sum(s.stopped for s in res) >= 8 and len(set(texts)) > 8  # not vacuous


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tiny_chat_folder(smollm, tmp_path_factory):
    """A tiny random llama saved with the embedded tokenizer (chat template, digit tokens):
    a model folder `generate --model` loads in a second."""
    from _chat_tiny import make_tiny_chat

    from steerdiff.models import unwrap

    path = tmp_path_factory.mktemp("tiny-chat")
    unwrap(make_tiny_chat(smollm.tokenizer)).save_pretrained(path)
    smollm.tokenizer.save_pretrained(path)
    return path


def _generate_args(folder, out, *extra, max_new_tokens=16):
    return [
        "generate",
        "--model",
        str(folder),
        "--teacher",
        "plain",
        "--batch-size",
        "8",
        "--max-new-tokens",
        str(max_new_tokens),
        "--threads",
        "1",
        "--probe",
        "0",
        "--out",
        str(out),
        *extra,
    ]


def _progress_lines(path):
    return [json.loads(x) for x in progress_path(path).read_text().splitlines()]


def test_generate_n_valid_writes_exactly_n_rows(tiny_chat_folder, tmp_path, monkeypatch):
    """README: `generate --n-valid N` stops when N valid rows exist. Bugs caught: stopping at
    a chunk boundary (more rows than asked), manifest figures that do not match the rows
    and the progress file (counts, rates, tokens/s), banned numbers not recorded or not
    applied, and a rich progress bar (carriage returns) when stderr is a log file."""
    from typer.testing import CliRunner

    from steerdiff.cli import app
    from steerdiff.tasks.numbers import BANNED_LISTS, judge

    monkeypatch.setenv("STEERDIFF_PROGRESS_EVERY", "0")  # a plain line per chunk
    out = tmp_path / "d.jsonl"
    args = ["--n-prompts", "96", "--n-valid", "12", "--banned-numbers", "gpt-evil,7"]
    args = _generate_args(tiny_chat_folder, out, *args, "--probe", "4", max_new_tokens=4)
    res = CliRunner().invoke(app, args)  # 4 tokens: some rows truncated, across 2 chunks
    assert res.exit_code == 0, res.output
    rows, man = load_dataset(out)
    assert len(rows) == 12 and man["n_valid"] == 12 and man["target_valid"] == 12
    lines = _progress_lines(out)
    marks = [x for x in lines if "id" in x]
    chunks = [x for x in lines if "chunk" in x]
    assert marks[-1]["ok"] and [m["id"] for m in marks] == list(range(len(marks)))
    assert man["n_prompts"] == len(marks) and [r["id"] for r in rows] == [
        m["id"] for m in marks if m["ok"]
    ]
    assert man["rejects"] == dict(Counter(m["reason"] for m in marks if not m["ok"]))
    assert len(chunks) == 2 and man["rejects"]["truncated"] > 0
    assert man["valid_rate"] == round(12 / len(marks), 4)
    assert man["generated_tokens"] == sum(c["new_tokens"] for c in chunks)
    assert man["generation_seconds"] == round(sum(c["seconds"] for c in chunks), 2)
    assert man["tokens_per_second"] == round(
        man["generated_tokens"] / sum(c["seconds"] for c in chunks), 2
    )
    probe = man["unconstrained_probe_n"]
    assert probe == 4 and man["unconstrained_valid_rate"] == round(
        (probe - sum(man["unconstrained_probe_rejects"].values())) / probe, 4
    )
    banned = sorted({*BANNED_LISTS["gpt-evil"], 7})
    assert man["numbers_config"]["banned_numbers"] == banned
    tok = AutoTokenizer.from_pretrained(tiny_chat_folder)
    cfg = NumbersConfig(banned_numbers=tuple(banned))
    for r in rows:
        text = r["messages"][1]["content"]
        assert tok.decode(r["completion_ids"][:-1]) == text and judge(text, True, cfg).ok
    ours = [x for x in res.stderr.split("\n") if "generate:" in x]  # (not the model loader's)
    assert ours[-1].startswith(f"generate: {len(marks)}/96 ") and len(ours) >= 2
    assert all(x.startswith("generate: ") and "\r" not in x for x in ours)


@pytest.mark.slow
def test_generate_killed_mid_overwrite_keeps_the_old_dataset(tiny_chat_folder, tmp_path):
    """Bug caught: `generate --overwrite` deleting the finished dataset at start, so a kill
    -9 during the new generation leaves nothing; and the same --overwrite command, run
    again, starting the new dataset over instead of resuming it (row for row the same as
    an uninterrupted run)."""
    from typer.testing import CliRunner

    from steerdiff.cli import app

    out = tmp_path / "d.jsonl"
    old = CliRunner().invoke(app, _generate_args(tiny_chat_folder, out, "--n-prompts", "40"))
    assert old.exit_code == 0, old.output
    files = (out, progress_path(out), manifest_path(out))
    before = [p.read_bytes() for p in files]
    new_args = _generate_args(tiny_chat_folder, out, "--n-prompts", "160", "--seed", "2")
    part = progress_path(partial_path(out))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "steerdiff.cli", *new_args, "--overwrite"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if part.exists() and part.read_text().count('"chunk"') >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = part.read_text()
    assert 2 <= written.count('"chunk"') < 5, "the kill must land mid-generation"
    assert [p.read_bytes() for p in files] == before  # the old dataset, byte for byte
    resumed = CliRunner().invoke(app, [*new_args, "--overwrite"])
    assert resumed.exit_code == 0, resumed.output
    assert not part.exists() and not partial_path(out).exists()
    complete = written[: written.rfind("\n") + 1]  # a line the kill tore is repaired
    assert progress_path(out).read_text().startswith(complete)  # resumed, not restarted
    whole = tmp_path / "whole.jsonl"
    assert (
        CliRunner().invoke(app, _generate_args(tiny_chat_folder, whole, *new_args[-4:])).exit_code
        == 0
    )
    assert out.read_bytes() == whole.read_bytes()
    assert load_dataset(out)[1]["n_prompts"] == 160
