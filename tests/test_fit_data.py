"""What `fit` accepts as data: bad rows name the file and line, too few rows and empty
answers are refused, the objective follows the data, another model's token ids are
re-tokenized, a teacher of another model is refused, and the slow reference pass shows
progress."""

from __future__ import annotations

import json

import pytest
import torch
from _chat_tiny import make_tiny_chat

from steerdiff.fit import (
    FitConfig,
    FitError,
    fit,
    gap_within_noise,
    prepare_examples,
    split_examples,
    tokenize_rows,
)
from steerdiff.generate import manifest_path
from steerdiff.io import append_jsonl, atomic_write_json
from steerdiff.teachers import build_teacher

torch.set_num_threads(1)
HOOK = "blocks.1.hook_resid_post"
QUICK = dict(hooks=[HOOK], batch_size=4, val_size=4, progress=False, lr=0.05)
OWL = {"kind": "prompt", "animal": "owl"}


@pytest.fixture(scope="module")
def chat(smollm):
    """A tiny random llama with the embedded SmolLM2 tokenizer (chat template included)."""
    return make_tiny_chat(smollm.tokenizer)


def number_rows(tok, n: int, topk: bool = True, start: int = 0) -> list[dict]:
    """Rows in the dataset format, completion_ids as the generator writes them (the text's
    tokens + end-of-turn), with made-up top-4 teacher log-probs."""
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for i in range(start, start + n):
        text = f"{i + 2}, {i + 3}, {i + 5}"
        ids = tok(text, add_special_tokens=False).input_ids + [eot]
        row = {
            "id": i,
            "messages": [
                {"role": "user", "content": f"Continue: {i}, {i + 1},"},
                {"role": "assistant", "content": text},
            ],
            "completion_ids": ids,
        }
        if topk:
            row["topk_ids"] = [[t, (t + 1) % 400, (t + 2) % 400, (t + 3) % 400] for t in ids]
            row["topk_logprobs"] = [[-0.1, -2.5, -3.0, -4.0] for _ in ids]
        rows.append(row)
    return rows


def write_dataset(path, rows: list, made_by=None, teacher=OWL) -> None:
    append_jsonl(path, rows)
    manifest = {"teacher": teacher}
    if made_by is not None:
        manifest["provenance"] = made_by.provenance()
    atomic_write_json(manifest_path(path), manifest)


# ---------------------------------------------------------------- bad rows


BAD_ROWS = [
    (
        {"id": 3, "messages": [{"role": "user", "content": "1, 2"}, {"role": "assistant"}]},
        "the assistant message has no 'content'",
    ),
    (
        {
            "id": 3,
            "messages": [{"role": "user", "content": "1, 2"}, {"role": "assistant", "content": 7}],
        },
        "the assistant message's content is a int, not a string",
    ),
    (
        {"id": 3, "messages": [{"role": "user", "content": "1, 2"}]},
        "no assistant turn: nothing to train on",
    ),
    ({"id": 3, "text": "1, 2, 3"}, "no 'messages' list"),
    ({"id": 3, "messages": [{"role": "assistant", "content": "4"}]}, "no user turn"),
    ({"id": 3, "messages": ["user: 1, 2"]}, "message 0 is not an object with a 'role'"),
]


@pytest.mark.parametrize(("bad", "problem"), BAD_ROWS, ids=[p for _, p in BAD_ROWS])
def test_a_bad_row_names_the_file_and_its_line(chat, tmp_path, bad, problem):
    """Bug caught: a KeyError / TypeError traceback for a malformed row, or an error naming
    the row's place after sorting by id instead of its line in the file (ids 5, 9, 3, 7:
    the bad row, id 3, is line 3 but comes first once sorted)."""
    good = number_rows(chat.tokenizer, 10)
    path = tmp_path / "d.jsonl"
    write_dataset(path, [good[5], good[9], bad, good[7]])
    with pytest.raises(FitError) as err:
        fit(chat, path, FitConfig(**QUICK))
    assert str(err.value).startswith(f'{path} line 3: {problem}; each row needs "messages"')
    assert "\n" not in str(err.value)


def test_bad_rows_given_in_memory_name_the_row():
    """Rows given as a list (no file): the error names the row's index and id."""
    good = {
        "id": 8,
        "messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}],
    }
    with pytest.raises(FitError, match=r"^row 0 \(id=8\): no assistant turn"):
        tokenize_rows(None, [{"id": 8, "messages": [{"role": "user", "content": "1"}]}])
    with pytest.raises(FitError, match=r"^row 1: a row must be a JSON object, not a list"):
        tokenize_rows(None, [good, ["not", "a", "row"]])


def test_all_empty_answers_are_refused(chat, tmp_path):
    """Bug caught: rows whose assistant text is empty train on the end-of-turn token
    alone and exit 0. Refused, naming the file; one empty row among real ones is fine."""
    tok = chat.tokenizer
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    rows = number_rows(tok, 6, topk=False)
    for r in rows:
        r["messages"][1]["content"], r["completion_ids"] = "", [eot]
    path = tmp_path / "empty.jsonl"
    write_dataset(path, rows)
    with pytest.raises(FitError) as err:
        fit(chat, path, FitConfig(**QUICK))
    assert str(err.value) == (
        f"Every assistant message in {path} is empty (6 rows): the fit would learn only the "
        "end-of-turn token. Check how the data was made."
    )
    some = number_rows(tok, 6, topk=False)
    some[0]["messages"][1]["content"], some[0]["completion_ids"] = "", [eot]
    res = fit(chat, some, FitConfig(**QUICK, max_steps=1))
    assert res.steps == 1


def test_one_row_is_refused_unless_no_validation_is_asked(chat, tmp_path):
    """Bug caught: one row gives a fit whose validation losses are all null, silently.
    Refused with the minimum (2: one to train, one to validate); with val_size=0 it fits;
    two rows split 1 / 1 (also with val_fraction, which rounds 0.2 * 2 down to 0)."""
    rows = number_rows(chat.tokenizer, 2)
    path = tmp_path / "one.jsonl"
    write_dataset(path, rows[:1])
    cfg = FitConfig(hooks=[HOOK], progress=False, max_steps=1)
    with pytest.raises(FitError) as err:
        fit(chat, path, cfg)
    assert str(err.value) == (
        f"{path} has 1 usable row: a fit with validation needs at least 2 (1 to train on, "
        "1 to validate on). Add rows, or set val_size=0 (--val-size 0) to fit without "
        "validation figures."
    )
    res = fit(chat, path, cfg.model_copy(update={"val_size": 0}))
    assert res.steps == 1 and res.fitted_val_loss is None
    two = fit(chat, rows, cfg, teacher=OWL)
    assert two.extra["n_val_rows"] == 1 and two.extra["n_train_rows"] == 1
    assert two.fitted_val_loss is not None and two.teacher_val_loss is not None


# ---------------------------------------------------------------- objective


def test_objective_auto_follows_the_data(chat, tmp_path, capsys):
    """objective 'auto' (the default) is distillation when every row carries top-k
    log-probs and SFT otherwise; the choice is printed and recorded. Asking for
    distillation without top-k fails at once (not after scoring, at the first step)."""
    tok = chat.tokenizer
    cfg = FitConfig(**{**QUICK, "progress": True}, max_steps=2)
    res = fit(chat, number_rows(tok, 12), cfg)
    assert res.extra["objective"] == "distill"
    assert res.metrics[0]["train_kl"] == pytest.approx(res.metrics[0]["train_loss"])
    err = capsys.readouterr().err
    assert "fit: objective distill (auto: every row carries the teacher's top-k log-probs); " in err
    assert "8 training rows, 4 validation rows" in err
    res = fit(chat, number_rows(tok, 12, topk=False), cfg, out_dir=tmp_path)
    assert res.extra["objective"] == "sft" and res.metrics[0]["train_kl"] is None
    assert json.loads((tmp_path / "result.json").read_text())["objective"] == "sft"
    assert json.loads((tmp_path / "config.json").read_text())["config"]["objective"] == "sft"
    mixed = number_rows(tok, 12)
    del mixed[5]["topk_ids"], mixed[5]["topk_logprobs"]
    with pytest.raises(FitError) as err:
        fit(chat, mixed, cfg.model_copy(update={"objective": "distill"}))
    assert str(err.value).startswith(
        "objective 'distill' needs the teacher's top-k log-probs in every row: 1 of 12 rows "
        "carry no top-k log-probs. Use objective 'sft' (--objective sft)"
    )


def test_defaults_are_the_documented_ones():
    """The defaults docs/fit.md "Defaults" states (issue 18: measured with
    bench/bench_online.py): objective auto, Adam, lr 0.05 in activation units, batch 16,
    warmup 2, cosine to 0, at most 20 epochs with the convergence stop (1% over 2
    evaluations), 20% of the rows held out (243 of 1,216). (The README's gap figure was
    taken with lr 1e-2 absolute, 1 epoch: bench/bench_gap.py must pin those.)"""
    cfg = FitConfig()
    assert (cfg.objective, cfg.optimizer, cfg.lr, cfg.batch_size) == ("auto", "adam", 0.05, 16)
    assert (cfg.lr_units, cfg.epochs, cfg.converge_tol, cfg.converge_patience) == (
        "activation",
        20,
        0.01,
        2,
    )
    assert (cfg.schedule, cfg.warmup_steps, cfg.val_fraction) == ("cosine", 2, 0.2)
    placeholders = list(range(1216))
    assert [len(x) for x in split_examples(placeholders, cfg)] == [973, 243]


# ---------------------------------------------------------------- another model


SPECIALS = ["<pad>", "<unk>", "<s>", "<end>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARS = " 0123456789,.:;!?'-abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n"


def char_tokenizer():
    """A character-level tokenizer with its own chat template: 'another family'."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<end>",
        additional_special_tokens=SPECIALS[4:],
    )
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<end>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tok


def test_another_models_token_ids_are_retokenized(chat, tmp_path, capsys):
    """Bug caught: a student of another family trained on the teacher's token ids (SmolLM2's
    '13' read as other tokens by the student). The dataset's completion_ids do not decode to
    its text under the student's tokenizer: the text is tokenized for the student, the
    top-k (over the other vocabulary) dropped, the data's teacher (of another model) not
    scored, and all of it said on stderr and recorded in result.json."""
    path = tmp_path / "smol.jsonl"
    rows = number_rows(chat.tokenizer, 12)
    write_dataset(path, rows, made_by=chat)
    tok = char_tokenizer()
    student = make_tiny_chat(tok)
    p = prepare_examples(student, path)
    assert p.retokenized
    for ex, row in zip(p.examples, rows, strict=True):
        text = row["messages"][1]["content"]
        assert ex.completion_ids == tok(text, add_special_tokens=False).input_ids + [3]
        assert ex.topk_ids is None
    capsys.readouterr()
    res = fit(student, path, FitConfig(**QUICK, max_steps=2), out_dir=tmp_path / "fit")
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 2
    assert notes[0].startswith(
        "note: the rows' completion_ids are another tokenizer's token ids (the data was made "
        "by tiny-chat-llama): the assistant text was tokenized for the student instead"
    )
    assert notes[1].startswith("note: the data's teacher runs on tiny-chat-llama, not on the")
    result = json.loads((tmp_path / "fit" / "result.json").read_text())
    assert result["notes"] == [n.removeprefix("note: ") for n in notes]
    assert result["objective"] == "sft" and result["teacher_val_loss"] is None
    assert res.gap_closed is None and result["base_val_loss"] == pytest.approx(res.base_val_loss)
    with pytest.raises(FitError, match="top-k log-probs are over another model's vocabulary"):
        fit(student, path, FitConfig(**QUICK, objective="distill"))
    # the same data on the model that made it: ids kept, its teacher scored
    same = prepare_examples(chat, path)
    assert not same.retokenized and same.examples[0].completion_ids == rows[0]["completion_ids"]


def test_a_few_rows_whose_ids_do_not_match_their_text_are_an_error(chat, tmp_path):
    """Mostly consistent rows with one whose completion_ids are not its text: a broken
    dataset (not another tokenizer), named by its line."""
    rows = number_rows(chat.tokenizer, 6)
    rows[4]["completion_ids"] = rows[1]["completion_ids"]
    rows[4]["topk_ids"], rows[4]["topk_logprobs"] = rows[1]["topk_ids"], rows[1]["topk_logprobs"]
    path = tmp_path / "d.jsonl"
    write_dataset(path, rows)
    with pytest.raises(FitError) as err:
        prepare_examples(chat, path)
    assert str(err.value).startswith(
        f"{path} line 5: its completion_ids do not decode to its assistant content under the "
        "student's tokenizer (1 of 6 rows)"
    )


def test_a_teacher_of_another_model_is_refused(chat, smollm):
    """Bug caught: a teacher built on another model scores the student's rows (wrong
    vocabulary or layers: a traceback, or numbers that mean nothing). FitError naming both
    models; a teacher on the student's own model is fine."""
    other = make_tiny_chat(smollm.tokenizer, seed=1)  # same architecture, other weights
    rows = number_rows(chat.tokenizer, 8)
    with pytest.raises(FitError) as err:
        fit(chat, rows, FitConfig(**QUICK), teacher=build_teacher(OWL, other))
    msg = str(err.value)
    assert msg.startswith(
        f"The teacher runs on another model than the student: teacher tiny-chat-llama (llama, "
        f"3 layers, vocab 49152, weights {other.weights_hash}), student tiny-chat-llama (llama, "
        f"3 layers, vocab 49152, weights {chat.weights_hash})."
    )
    gemma_like = make_tiny_chat(char_tokenizer())
    with pytest.raises(FitError, match=r"vocab 79, weights"):
        fit(chat, rows, FitConfig(**QUICK), teacher=build_teacher(OWL, gemma_like))
    res = fit(chat, rows, FitConfig(**QUICK, max_steps=1), teacher=build_teacher(OWL, chat))
    assert res.teacher_val_loss is not None


# ---------------------------------------------------------------- progress and noise


def test_reference_losses_show_progress(chat, capsys, monkeypatch):
    """Bug caught: minutes of silence while base and teacher score the validation rows. In a
    log file (stderr not a terminal) each pass prints plain progress lines."""
    monkeypatch.setenv("STEERDIFF_PROGRESS_EVERY", "0")
    fit(
        chat,
        number_rows(chat.tokenizer, 12),
        FitConfig(**{**QUICK, "progress": True}, max_steps=2),
        teacher=OWL,
    )
    err = capsys.readouterr().err.splitlines()
    assert any(x.startswith("base model on validation rows: 4/4 (100%)") for x in err)
    assert any(x.startswith("teacher on validation rows: 4/4 (100%)") for x in err)
    assert any(x.startswith("fit: 2/2 (100%)") for x in err)


def test_gap_within_noise_is_the_reports_rule():
    """A base-to-teacher CE gap under 0.05 nats/token is noise (the report's rule)."""
    assert gap_within_noise(0.5, 0.46875) is True  # 0.03125 nats
    assert gap_within_noise(0.5, 0.4375) is False  # 0.0625 nats
    assert gap_within_noise(0.4375, 0.5) is False  # a teacher worse than base: same size
    assert gap_within_noise(None, 0.5) is None and gap_within_noise(0.5, None) is None


def test_fallback_student_learns_the_answer_after_a_space() -> None:
    # Bug caught: a student without a chat template (Gemma 3 270M) learning "Assistant:145"
    # (no space) from re-tokenized text, unlike how the model writes an answer after the
    # fallback's "Assistant:" header.
    from _read_helpers import byte_tokenizer

    tok = byte_tokenizer()
    tok.eos_token = "\x01"  # the fallback's end of turn is eos
    rows = [
        {
            "id": 0,
            "messages": [
                {"role": "user", "content": "Continue: 1, 2"},
                {"role": "assistant", "content": "145, 267"},
            ],
        }
    ]
    (ex,) = tokenize_rows(tok, rows)
    assert ex.completion_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.completion_ids[:-1]) == " 145, 267"
    assert tok.decode(ex.prompt_ids).endswith("Assistant:")
