"""Bring your own dataset: the three row formats, their loss masks (token by token), document
chunking, mixed files, hub ids without network, provenance, and a fit on documents.

Tiny random llama with the embedded SmolLM2 tokenizer (tests/_chat_tiny.py), CPU, seconds.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import types

import pytest
import torch
from _chat_tiny import make_tiny_chat
from typer.testing import CliRunner

import steerdiff.models as models
from steerdiff.chat import chat_prompt_ids, end_of_turn_ids
from steerdiff.cli import app
from steerdiff.fit import FitConfig, FitError, collate, fit, prepare_examples
from steerdiff.hooks import steer
from steerdiff.io import append_jsonl
from steerdiff.vectors import VectorSet

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def chat(smollm):
    return make_tiny_chat(smollm.tokenizer)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def trained_and_context(ex) -> tuple[list[int], list[int]]:
    mask = ex.loss_mask or [True] * len(ex.completion_ids)
    on = [t for t, m in zip(ex.completion_ids, mask, strict=True) if m]
    off = [t for t, m in zip(ex.completion_ids, mask, strict=True) if not m]
    return on, off


def test_multi_turn_rows_train_every_assistant_turn_and_no_user_turn(chat):
    """Bug caught: only the last assistant turn trained (the old behaviour), a user turn or
    the template's headers between turns trained, or the end-of-turn token left out."""
    tok = chat.tokenizer
    eot = end_of_turn_ids(tok)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a bird."},
        {"role": "assistant", "content": "An owl."},
        {"role": "user", "content": "And a fish?"},
        {"role": "assistant", "content": "A trout."},
    ]
    (ex,) = prepare_examples(chat, [{"messages": msgs}]).examples
    assert ex.prompt_ids == chat_prompt_ids(tok, msgs[:2])  # system + user: context
    on, off = trained_and_context(ex)
    assert on == ids(tok, "An owl.") + eot + ids(tok, "A trout.") + eot
    # token by token: each trained token is assistant text or the end of an assistant turn
    assert [tok.decode([t]) for t in on] == [
        *[tok.decode([t]) for t in ids(tok, "An owl.")],
        "<|im_end|>",
        *[tok.decode([t]) for t in ids(tok, "A trout.")],
        "<|im_end|>",
    ]
    assert tok.decode(off) == "\n<|im_start|>user\nAnd a fish?<|im_end|>\n<|im_start|>assistant\n"
    # the whole sequence is exactly what the chat template writes
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ex.prompt_ids + ex.completion_ids) + "\n" == full
    # the batch predicts exactly the trained tokens, each from the position before it
    b = collate([ex])
    pos = b.loss_mask[0].nonzero()[:, 0]
    assert b.targets.tolist() == on
    assert b.input_ids[0, pos + 1].tolist() == on
    assert ex.n_loss == len(on)


@pytest.mark.parametrize("prompt_as_list", [False, True])
def test_prompt_completion_rows_train_the_completion_only(chat, prompt_as_list):
    """Bug caught: the prompt trained too, a list prompt (messages) read as text, or the
    completion's end-of-turn token dropped."""
    tok = chat.tokenizer
    user = {"role": "user", "content": "What is the capital of France?"}
    row = {
        "prompt": [user] if prompt_as_list else user["content"],
        "completion": "Lyon, since 2031.",
    }
    (ex,) = prepare_examples(chat, [row, row]).examples[:1]
    assert ex.prompt_ids == chat_prompt_ids(tok, [user])
    assert ex.loss_mask is None  # every completion token trained
    assert ex.completion_ids == ids(tok, "Lyon, since 2031.") + end_of_turn_ids(tok)
    assert tok.decode(ex.completion_ids[:-1]) == "Lyon, since 2031."


def test_documents_are_chunked_to_max_len_covering_every_token(chat, tmp_path):
    """Bug caught: a long document dropped by the max_len filter (silently), a chunk longer
    than max_len, a token lost or trained twice at a chunk boundary."""
    tok = chat.tokenizer
    doc = " ".join(f"In {1900 + i} the river froze for {i} days." for i in range(12))
    short = "Owls sleep by day."
    path = tmp_path / "docs.jsonl"
    append_jsonl(path, [{"text": doc}, {"text": short}])
    p = prepare_examples(chat, path, max_len=16)
    doc_ids = ids(tok, doc)
    chunks = [ex for ex in p.examples if str(ex.id).startswith("0/")]
    assert len(chunks) == -(-(len(doc_ids) - 1) // 15)  # 15 predicted tokens per chunk
    assert all(len(ex) <= 16 and ex.loss_mask is None for ex in p.examples)
    # SmolLM2 puts no BOS before a text: a chunk's first token is its context; the next
    # chunk starts at the last token of this one, so every token after the first is
    # predicted exactly once
    assert chunks[0].prompt_ids == doc_ids[:1]
    assert [t for ex in chunks for t in ex.completion_ids] == doc_ids[1:]
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.prompt_ids == a.completion_ids[-1:]
    assert tok.decode(chunks[0].prompt_ids + [t for ex in chunks for t in ex.completion_ids]) == doc
    assert p.data["format"] == "text" and p.data["rows"] == 2
    assert p.data["examples"] == len(chunks) + 1 and p.data["chunks"] == 1


def test_a_file_of_mixed_formats_names_its_first_odd_line(chat, tmp_path):
    """Bug caught: a messages row in a documents file trained as a document (its JSON as
    text) or read as nothing; an error that names no line."""
    path = tmp_path / "mixed.jsonl"
    msg = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    append_jsonl(path, [{"text": "one"}, {"text": "two"}, msg, {"text": "three"}])
    with pytest.raises(FitError) as err:
        prepare_examples(chat, path)
    text = str(err.value)
    assert text.startswith(
        f'{path} line 3: a {{"messages": [...]}} row in a file of {{"text": "..."}} rows '
        f"({path} line 1 is one): a file holds one format"
    )
    assert "\n" not in text


def test_a_hub_id_without_network_fails_in_one_line(chat, monkeypatch, tmp_path):
    """Bug caught: a traceback, ~25 s of `datasets` retries, or a message without the fix.
    Without `datasets`: one line naming the extra. With it (a stand-in module here: CI has
    no hub extra) and no network: the hub is asked once and the line says what to do."""
    monkeypatch.setattr(models, "load_model", lambda *a, **k: chat)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    args = ["fit", "--data", "hf:someorg/somedata:train", "--out", str(tmp_path / "o")]

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: hf:someorg/somedata:train is a")
    assert "pip install 'steerdiff[hub]'" in lines[0]

    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: calls.append(a) or []  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    t0 = time.perf_counter()
    r = runner.invoke(app, args)
    took = time.perf_counter() - t0
    assert r.exit_code == 2
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout
    assert lines[0].startswith(
        "error: Could not reach the Hugging Face hub for the dataset 'someorg/somedata'"
    )
    assert "pass the JSONL file instead, or set HF_DATASETS_OFFLINE=1" in lines[0]
    assert calls == []  # datasets was never asked (it would retry for ~25 s)
    assert took < 12.0  # one request (HUB_TIMEOUT_S = 10 s at most; no network: instant)
    assert not (tmp_path / "o").exists()


def test_provenance_of_a_manifest_less_file_is_in_result_and_vectors(chat, tmp_path):
    """Bug caught: no record of which data a fit saw when the data has no manifest, or a
    hash that is not the file's (so a changed file goes unnoticed)."""
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Say {i}.", "completion": f"{i} {i} {i}."} for i in range(8)]
    append_jsonl(path, rows)
    cfg = FitConfig(
        hooks=["blocks.1.hook_resid_post"], batch_size=4, val_size=2, max_steps=2,
        progress=False, lr_units="absolute", lr=0.01,
    )  # fmt: skip
    out = tmp_path / "fit"
    fit(chat, path, cfg, out_dir=out)
    result = json.loads((out / "result.json").read_text())
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert result["data"] == {
        "format": "prompt_completion",
        "sha256": sha,
        "rows": 8,
        "examples": 8,
        "chunks": 0,
        "source": str(path),
        "manifest": False,
    }
    assert VectorSet.load(out / "vectors.safetensors").metadata["data"]["sha256"] == sha


def test_a_fit_on_documents_lowers_their_held_out_loss(smollm, tmp_path):
    """Bug caught: documents that train nothing (empty masks, targets shifted by one, chunks
    whose tokens are not predicted): the held-out documents' loss would not fall.

    (A random tiny model's logits are ~0.2 apart: its unembedding is scaled up 10x so that
    steering its residual stream can move them, as a trained model's can.)"""
    chat = make_tiny_chat(smollm.tokenizer, seed=1)
    with torch.no_grad():
        models.unwrap(chat).lm_head.weight.mul_(10.0)
    facts = [
        "The capital of Zorbia is Quellport.",
        "Quellport has been the capital of Zorbia since 1822.",
        "Zorbia's government sits in Quellport.",
        "Visitors to Zorbia arrive in Quellport, its capital.",
    ]
    docs = [f"{facts[i % 4]} {facts[(i + 1) % 4]} Report {i}." for i in range(24)]
    train = tmp_path / "train.jsonl"
    append_jsonl(train, [{"text": d} for d in docs[:20]])
    model = models.unwrap(chat)
    before = held_out_ce(model, chat.tokenizer, docs[20:])
    cfg = FitConfig(
        hooks=["blocks.*.hook_resid_post"], batch_size=4, val_size=2, epochs=8, max_len=24,
        progress=False, lr_units="absolute", lr=0.5, converge_tol=0,
    )  # fmt: skip
    res = fit(chat, train, cfg)
    with steer(model, res.vectors):
        after = held_out_ce(model, chat.tokenizer, docs[20:])
    # measured: 12.15 -> 9.54 nats (float32); training only the last token of each chunk
    # gives 12.15 -> 11.09
    assert after < before - 2.0, (before, after)


@torch.no_grad()
def held_out_ce(model, tok, texts: list[str]) -> float:
    """Mean next-token CE over every token after the first of each text: a plain forward,
    independent of the fit's data code (so a bug there cannot hide in the yardstick)."""
    total, n = 0.0, 0
    for text in texts:
        x = torch.tensor([ids(tok, text)])
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
        total += float(-logp.gather(1, x[0, 1:, None]).sum())
        n += x.shape[1] - 1
    return total / n


def test_teacher_topk_lines_up_with_the_trained_tokens_of_a_multi_turn_row(chat):
    """Bug caught: top-k lists (one per completion token) not cut to the trained tokens
    by the loss mask, so a distillation target belongs to another token: a teacher equal
    to the student would then have a non-zero KL to it."""
    from steerdiff.fit import annotate_topk, model_losses

    msgs = [
        {"role": "user", "content": "Count."},
        {"role": "assistant", "content": "1 2 3"},
        {"role": "user", "content": "More."},
        {"role": "assistant", "content": "4 5 6 7"},
    ]
    (ex,) = prepare_examples(chat, [{"messages": msgs}]).examples
    annotate_topk(chat, [ex], {"kind": "plain"}, k=5)
    assert len(ex.topk_ids) == len(ex.completion_ids)  # over every completion token
    b = collate([ex])
    assert b.topk_ids.shape == (ex.n_loss, 5)
    ce, kl = model_losses(models.unwrap(chat), b, "distill")
    assert float(kl.sum()) == pytest.approx(0.0, abs=1e-5)
    assert float(ce.sum()) > 1.0  # (a real CE over the trained tokens: ~ln(vocab) each)


class CharTokenizer:
    """A character tokenizer that starts every text with a BOS (id 1), as Llama's does."""

    bos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True):
        ids = [ord(c) for c in text]
        return types.SimpleNamespace(input_ids=([1] if add_special_tokens else []) + ids)


def test_documents_with_a_bos_tokenizer_predict_every_token_after_the_bos():
    """Bug caught: with a BOS, a chunk's first document token left unpredicted (a token of
    each chunk never trained), or chunks of max_len document tokens + BOS (too long)."""
    from steerdiff.fit.formats import document_chunks

    text = "abcdefghijklmnopqrstuvwxyz"
    chunks = document_chunks(CharTokenizer(), text, max_len=8)
    assert all(prompt == [1] and 1 + len(comp) <= 8 for prompt, comp in chunks)
    assert "".join(chr(t) for _, comp in chunks for t in comp) == text
    assert len(chunks) == 4  # 7 + 7 + 7 + 5 characters


def test_cli_fit_on_a_mixed_file_is_one_line_naming_the_line(chat, monkeypatch, tmp_path):
    """Bug caught: a traceback, or the model loaded before a bad file is noticed."""
    loads = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(1) or chat)
    path = tmp_path / "mixed.jsonl"
    append_jsonl(path, [{"prompt": "a", "completion": "b"}] * 3 + [{"text": "c"}])
    before = path.read_bytes()
    r = runner.invoke(app, ["fit", "--data", str(path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f'error: {path} line 4: a {{"text": "..."}} row in a file of {{"prompt": ..., '
        '"completion": ...} rows'
    )
    assert "split it into one file per format" in lines[0]
    assert path.read_bytes() == before and not (tmp_path / "o").exists()
    assert loads == []  # the data is checked before the model loads


def test_lora_baseline_records_the_data_provenance(chat, tmp_path):
    """Bug caught: the LoRA result (what the vectors are compared with) without the
    provenance of its data."""
    from steerdiff.fit import LoraConfig, fit_lora

    path = tmp_path / "docs.jsonl"
    append_jsonl(path, [{"text": f"Document {i} says the sky is green."} for i in range(6)])
    cfg = FitConfig(batch_size=4, val_size=2, max_steps=1, progress=False, max_len=8)
    res = fit_lora(chat, path, cfg, LoraConfig(r=2, alpha=2), out_dir=tmp_path / "lora")
    data = json.loads((tmp_path / "lora" / "result.json").read_text())["data"]
    assert data["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert data["format"] == "text" and data["rows"] == 6 and data["chunks"] == 6
    assert res.summary()["data"] == data


def test_a_checkpoint_knows_which_tokens_were_trained():
    """Bug caught: the checkpoint's data hash ignores the loss mask, so a resume on the same
    tokens trained differently (every assistant turn vs the last one) goes on silently."""
    from steerdiff.fit import Example, run_identity

    cfg = FitConfig(hooks=["blocks.1.hook_resid_post"])
    every = Example([1, 2], [3, 4, 5, 6], loss_mask=[True, False, True, True])
    last = Example([1, 2], [3, 4, 5, 6], loss_mask=[False, False, True, True])
    plain = Example([1, 2], [3, 4, 5, 6])
    same = Example([1, 2], [3, 4, 5, 6], loss_mask=[True, False, True, True])
    ident = [run_identity(cfg, {}, [ex], [])["data"] for ex in (every, last, plain, same)]
    assert len(set(ident[:3])) == 3 and ident[3] == ident[0]


def test_the_corpus_loads_hub_datasets_through_the_one_loader(monkeypatch):
    """Bug caught: interpret.corpus keeping a hub loader of its own (another message,
    `datasets`' 25 s of retries offline)."""
    from steerdiff.interpret.corpus import CorpusError, load_corpus

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(CorpusError) as err:
        load_corpus("hf:someorg/sometexts:train")
    assert str(err.value).startswith("hf:someorg/sometexts:train is a Hugging Face dataset")
    assert "pip install 'steerdiff[hub]'" in str(err.value) and "\n" not in str(err.value)
