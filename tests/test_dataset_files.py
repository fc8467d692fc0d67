"""Dataset files: the resumable writer, --overwrite (old data kept until the new is complete),
and the one reader (every bad line or manifest is an error naming file:line and the fix)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
from conftest import make_tiny

import steerdiff.generate.dataset as dataset_module
from steerdiff.generate import (
    DatasetError,
    Judged,
    Sample,
    SampleStats,
    check_writable,
    load_dataset,
    manifest_path,
    progress_path,
    write_dataset,
)
from steerdiff.io import repair_jsonl


def _fake_generate(fail_after: int | None = None):
    """A generate_chunk stand-in: prompt i 'answers' str(i) (ok) or 'x' if i % 3 == 0."""
    calls = {"n": 0}

    def gen(indices):
        if fail_after is not None and calls["n"] >= fail_after:
            raise KeyboardInterrupt  # simulates a kill between chunks
        calls["n"] += 1
        out = [Sample(j, [1000 + i, 2], True) for j, i in enumerate(indices)]
        return out, SampleStats(prompt_tokens=10, new_tokens=2 * len(indices), seconds=0.5)

    return gen


def _decode(ids):
    return "x" if (ids[0] - 1000) % 3 == 0 else str(ids[0] - 1000)


def _judge(text, s):
    return Judged(text != "x", "non_digit" if text == "x" else "")


def _write(out, gen, **kw):
    prompts = [f"prompt {i}" for i in range(20)]
    return write_dataset(
        out, prompts, gen, _judge, _decode, {"teacher": {"kind": "plain"}}, chunk_size=4, **kw
    )


class Chunky:
    """Like batched sampling seeded by the chunk's first index: prompt i's answer depends on
    the chunk it is generated in (so redoing part of a chunk gives other rows). Counts the
    chunks it generates; raises KeyboardInterrupt (a kill) before chunk number `fail_at`."""

    def __init__(self, salt: int = 0, fail_at: int | None = None) -> None:
        self.salt, self.fail_at, self.calls = salt, fail_at, 0

    def __call__(self, indices):
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise KeyboardInterrupt
        self.calls += 1
        first = indices[0]
        out = [
            Sample(j, [1000 + i if (i + first + self.salt) % 3 else 999, 2], True)
            for j, i in enumerate(indices)
        ]
        return out, SampleStats(prompt_tokens=10, new_tokens=2 * len(indices), seconds=0.5)


def _chunky_decode(ids):
    return "x" if ids[0] == 999 else str(ids[0] - 1000)


def _write_chunky(out, gen, settings="A", **kw):
    prompts = [f"prompt {i}" for i in range(20)]
    run = {"teacher": {"kind": "plain"}, "settings": settings}
    return write_dataset(out, prompts, gen, _judge, _chunky_decode, run, chunk_size=4, **kw)


def _snapshot(out):
    """The bytes of a dataset's three files (None where absent)."""
    files = (out, progress_path(out), manifest_path(out))
    return {p.name: p.read_bytes() if p.exists() else None for p in files}


def _partial_files(out):
    return sorted(p.name for p in out.parent.iterdir() if ".partial" in p.name)


def test_dataset_rows_manifest_and_resume_after_kill(tmp_path):
    out = tmp_path / "d.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _write(out, _fake_generate(fail_after=2))
    assert not manifest_path(out).exists()
    with pytest.raises(DatasetError, match="no manifest"):
        load_dataset(out)
    with open(out, "a") as f:  # a torn last line from a kill mid-write
        f.write('{"id": 99, "mess')
    man = _write(out, _fake_generate())
    rows, man2 = load_dataset(out)
    assert man == man2
    ids = [r["id"] for r in rows]
    assert ids == [i for i in range(20) if i % 3 != 0]  # no duplicates, nothing lost
    assert man["n_prompts"] == 20 and man["n_valid"] == 13 and man["rejects"] == {"non_digit": 7}
    assert (
        man["tokens_per_second"] == pytest.approx(40 / 2.5)
        and man["system_prompt_in_data"] is False
    )
    r = rows[0]
    assert set(r) == {"id", "messages", "completion_ids"}
    assert r["messages"] == [
        {"role": "user", "content": "prompt 1"},
        {"role": "assistant", "content": "1"},
    ]
    assert r["completion_ids"] == [1001, 2]
    with pytest.raises(DatasetError, match="already complete"):
        _write(out, _fake_generate())


def test_a_kill_between_rows_and_progress_resumes_byte_identically(tmp_path, monkeypatch):
    """Bug caught: a kill after a chunk's rows were appended but before its progress lines:
    the resume kept those rows and redid only the chunk's rejected prompts, in a chunk of
    their own (another seed), so the dataset differed from an uninterrupted one."""
    whole = tmp_path / "whole.jsonl"
    _write_chunky(whole, Chunky())
    out = tmp_path / "d.jsonl"
    real_append = dataset_module.append_jsonl
    appends = {"progress": 0}

    def killed_before_third_progress(path, rows):
        if str(path).endswith(".progress.jsonl") and any("chunk" in r for r in rows):
            appends["progress"] += 1
            if appends["progress"] == 3:
                raise KeyboardInterrupt  # the rows of chunk 3 are on disk, its marks not
        real_append(path, rows)

    monkeypatch.setattr(dataset_module, "append_jsonl", killed_before_third_progress)
    with pytest.raises(KeyboardInterrupt):
        _write_chunky(out, Chunky())
    monkeypatch.setattr(dataset_module, "append_jsonl", real_append)
    marked = {json.loads(x).get("id") for x in progress_path(out).read_text().splitlines()}
    written = {json.loads(x)["id"] for x in out.read_text().splitlines()}
    assert written - marked == {8, 9, 11}  # chunk 3 (prompts 8-11): rows on disk, no marks
    again = Chunky()
    _write_chunky(out, again)
    assert again.calls == 3  # chunks 3, 4, 5
    assert out.read_bytes() == whole.read_bytes()


def test_overwrite_keeps_the_old_dataset_until_the_new_one_is_complete(tmp_path):
    """Bugs caught: --overwrite deleting the finished dataset at start (a kill then leaves
    nothing), and re-running the same --overwrite command starting the new one over
    instead of resuming it."""
    out = tmp_path / "d.jsonl"
    _write_chunky(out, Chunky(), settings="A")
    old_rows, old_man = load_dataset(out)
    before = _snapshot(out)
    with pytest.raises(KeyboardInterrupt):  # killed after 2 of 5 chunks of the new dataset
        _write_chunky(out, Chunky(salt=1, fail_at=2), settings="B", overwrite=True)
    assert _snapshot(out) == before
    assert load_dataset(out) == (old_rows, old_man)
    assert _partial_files(out) == ["d.partial.jsonl", "d.partial.progress.jsonl"]
    with pytest.raises(DatasetError, match=r"already complete .*unfinished replacement is in d\."):
        _write_chunky(out, Chunky(salt=1), settings="B")
    resumed = Chunky(salt=1)
    man = _write_chunky(out, resumed, settings="B", overwrite=True)
    assert resumed.calls == 3  # the 2 chunks done before the kill were kept
    assert _partial_files(out) == []
    whole = tmp_path / "whole.jsonl"
    _write_chunky(whole, Chunky(salt=1), settings="B")
    assert out.read_bytes() == whole.read_bytes()
    assert load_dataset(out)[1] == man and man["settings"] == "B"
    assert man["files"] == {"data": "d.jsonl", "progress": "d.progress.jsonl"}
    first = json.loads(progress_path(out).read_text().splitlines()[0])
    assert first["run"]["settings"] == "B"
    # the same settings again with --overwrite: generated anew (5 chunks), then replaced
    fresh = Chunky(salt=1)
    _write_chunky(out, fresh, settings="B", overwrite=True)
    assert fresh.calls == 5 and out.read_bytes() == whole.read_bytes()


def test_a_kill_while_replacing_is_finished_by_the_next_run(tmp_path, monkeypatch):
    """Bugs caught: replacing the files in an order that lets a reader pair the OLD manifest
    with the NEW rows, and a re-run after a kill mid-replacement regenerating everything
    (or mixing the old progress file with the new rows)."""
    out = tmp_path / "d.jsonl"
    _write_chunky(out, Chunky(), settings="A")
    real_replace = os.replace
    calls = {"n": 0}

    def killed_after_first_rename(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # new rows in place, old progress, no manifest
        real_replace(src, dst)

    monkeypatch.setattr(dataset_module.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        _write_chunky(out, Chunky(salt=1), settings="B", overwrite=True)
    monkeypatch.setattr(dataset_module.os, "replace", real_replace)
    with pytest.raises(DatasetError, match="no manifest"):
        load_dataset(out)  # never the old manifest with the new rows
    again = Chunky(salt=1)
    man = _write_chunky(out, again, settings="B", overwrite=True)
    assert again.calls == 0 and man["settings"] == "B"
    whole = tmp_path / "whole.jsonl"
    _write_chunky(whole, Chunky(salt=1), settings="B")
    assert out.read_bytes() == whole.read_bytes()
    assert json.loads(progress_path(out).read_text().splitlines()[0])["run"]["settings"] == "B"
    assert load_dataset(out)[1] == man and _partial_files(out) == []


def test_overwrite_without_valid_rows_keeps_the_old_dataset(tmp_path):
    out = tmp_path / "d.jsonl"
    _write_chunky(out, Chunky())
    before = _snapshot(out)
    with pytest.raises(DatasetError, match=r"No valid rows: all 20 .*d\.jsonl is unchanged"):
        write_dataset(
            out,
            [f"p{i}" for i in range(20)],
            Chunky(),
            lambda text, s: Judged(False, "too_many"),
            _chunky_decode,
            {"k": 1},
            chunk_size=8,
            overwrite=True,
        )
    assert _snapshot(out) == before and _partial_files(out) == []


def test_load_dataset_missing_empty_and_plain_jsonl(tmp_path):
    """One reader for generate output and fit input: clear errors, plain JSONL without a
    manifest loads (manifest {}) when a complete dataset is not required."""
    with pytest.raises(DatasetError, match="Dataset not found: .*nope.jsonl"):
        load_dataset(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match="is empty: nothing to fit"):
        load_dataset(empty, require_complete=False)
    with pytest.raises(DatasetError, match="no manifest"):
        load_dataset(empty)
    plain = tmp_path / "plain.jsonl"
    msgs = [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "1"}]
        for i in (2, 0, 1)
    ]
    plain.write_text("".join(json.dumps({"messages": m}) + "\n" for m in msgs))
    rows, manifest = load_dataset(plain, require_complete=False)
    assert manifest == {} and [r["messages"] for r in rows] == msgs  # file order kept
    with pytest.raises(DatasetError, match="no manifest"):
        load_dataset(plain)


def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "d.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _write(out, _fake_generate(fail_after=1))
    with pytest.raises(DatasetError, match="other settings"):
        write_dataset(
            out, ["p"] * 20, _fake_generate(), _judge, _decode, {"teacher": {"kind": "x"}}
        )


def test_zero_valid_rows_is_a_clear_error_and_leaves_nothing(tmp_path):
    out = tmp_path / "d.jsonl"

    def reject(text, s):
        return Judged(False, "bad_separator" if int(text or 0) % 2 else "too_many")

    with pytest.raises(
        DatasetError,
        match=r"No valid rows: all 20 .*too_many: 10, bad_separator: 10|"
        r"No valid rows: all 20 .*bad_separator: 10, too_many: 10",
    ):
        write_dataset(
            out,
            [f"p{i}" for i in range(20)],
            _fake_generate(),
            reject,
            lambda ids: str(ids[0] - 1000),
            {"k": 1},
            chunk_size=8,
        )
    assert not out.exists() and not manifest_path(out).exists() and not progress_path(out).exists()


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DatasetError, match="Cannot write"):
        check_writable(blocker / "d.jsonl")  # its parent is a file
    with pytest.raises(DatasetError, match="is a folder"):
        (tmp_path / "dir.jsonl").mkdir()
        check_writable(tmp_path / "dir.jsonl")
    with pytest.raises(DatasetError, match="must end in .jsonl"):
        check_writable(tmp_path / "d.json")
    with pytest.raises(DatasetError, match="Cannot write"):
        _write(blocker / "d.jsonl", _fake_generate())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.jsonl", "file"]


def test_progress_file_records_every_prompt(tmp_path):
    out = tmp_path / "d.jsonl"
    _write(out, _fake_generate())
    lines = [json.loads(x) for x in progress_path(out).read_text().splitlines()]
    assert lines[0] == {"run": {"teacher": {"kind": "plain"}}}
    assert sorted(x["id"] for x in lines if "id" in x) == list(range(20))


def test_target_valid_stops_at_exactly_that_many_rows(tmp_path):
    """Bug caught: stopping only at a chunk boundary (9 rows for 7 asked, as the README's
    1,024 rows for --n-valid 1000 show), or counting prompts not used as processed."""
    out = tmp_path / "d.jsonl"
    man = _write(out, _fake_generate(), target_valid=7)
    rows, _ = load_dataset(out)
    valid = [i for i in range(20) if i % 3][:7]  # 1, 2, 4, 5, 7, 8, 10
    assert [r["id"] for r in rows] == valid and man["n_valid"] == 7
    marks = [json.loads(x) for x in progress_path(out).read_text().splitlines()]
    assert [m["id"] for m in marks if "id" in m] == list(range(11))  # up to prompt 10
    assert man["n_prompts"] == 11 and man["rejects"] == {"non_digit": 4}
    assert man["valid_rate"] == round(7 / 11, 4)


# ----------------------------------------------------------------------------- reading


def _rows(n):
    return [{"id": i, "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(n)]


def _lines(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_a_malformed_line_is_an_error_naming_file_and_line(tmp_path):
    """Bugs caught: a malformed LAST line of a plain dataset dropped silently as "torn"
    (silent data loss), a malformed line or a non-object row (a JSON list) reaching fit as
    a traceback, and a message without the file, the line number or the fix."""
    data = tmp_path / "d.jsonl"
    cases = {
        _lines(_rows(1)) + "{broken\n" + _lines(_rows(3)[2:]): r"d\.jsonl:2: not valid JSON",
        _lines(_rows(2)) + '{"id": 2, "mess': r"d\.jsonl:3: not valid JSON",
        _lines(_rows(1)) + "[1, 2]\n": r"d\.jsonl:2: a row must be a JSON object .*JSON list",
        _lines(_rows(1)) + '"text"\n': r"d\.jsonl:2: a row must be a JSON object .*JSON string",
    }
    for text, message in cases.items():
        data.write_text(text)
        with pytest.raises(DatasetError, match=message + r".*fix or delete that line\.$"):
            load_dataset(data, require_complete=False)
        assert data.read_text() == text  # nothing repaired or dropped on disk


def test_only_an_interrupted_dataset_may_end_in_a_torn_line(tmp_path):
    """Bug caught: a torn last line skipped without a word, or skipped in a FINISHED
    dataset (whose progress file says it completed)."""
    out = tmp_path / "d.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _write(out, _fake_generate(fail_after=2))  # interrupted: progress file, no manifest
    good = out.read_text()
    with open(out, "a") as f:
        f.write('{"id": 99, "mess')
    n_lines = len(good.splitlines()) + 1
    with pytest.warns(UserWarning, match=rf"d\.jsonl:{n_lines}: the last line is torn .*interr"):
        rows, manifest = load_dataset(out, require_complete=False)
    assert [r["id"] for r in rows] == [1, 2, 4, 5, 7] and manifest == {}
    _write(out, _fake_generate())  # the resume repairs it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows, manifest = load_dataset(out)
    assert len(rows) == manifest["n_valid"] == 13
    finished = out.read_text()
    with open(out, "a") as f:
        f.write('{"id": 99, "mess')
    with pytest.raises(
        DatasetError, match=r"d\.jsonl:14: not valid JSON .*re-run `steerdiff generate` with --ov"
    ):
        load_dataset(out)
    assert out.read_text() == finished + '{"id": 99, "mess'


def test_a_broken_manifest_names_the_file_and_the_fix_works(tmp_path):
    """Bug caught: a broken manifest reported as "Expecting property name..." without the
    file, or with a fix that does not work (here it is followed and must work)."""
    out = tmp_path / "d.jsonl"
    _write(out, _fake_generate())
    rows, man = load_dataset(out)
    manifest_path(out).write_text('{"teacher": ')
    with pytest.raises(
        DatasetError,
        match=r"The dataset manifest .*d\.manifest\.json is not valid JSON \(Expecting value at "
        r"line 1\): delete it and re-run the same `steerdiff generate` command \(it rewrites "
        r"the manifest from d\.progress\.jsonl\), or restore it\.$",
    ):
        load_dataset(out)
    manifest_path(out).unlink()  # the fix
    gen = Chunky()
    again = write_dataset(
        out,
        [f"prompt {i}" for i in range(20)],
        gen,
        _judge,
        _decode,
        {"teacher": {"kind": "plain"}},
        chunk_size=4,
    )
    assert gen.calls == 0 and again == man and load_dataset(out) == (rows, man)
    manifest_path(out).write_text("[1, 2]")
    with pytest.raises(DatasetError, match=r"d\.manifest\.json is not a JSON object \(a JSON list"):
        load_dataset(out)
    progress_path(out).unlink()  # a plain JSONL: no progress file to rebuild from
    with pytest.raises(DatasetError, match=r"d\.manifest\.json .*: restore it, or delete it to"):
        load_dataset(out)


def test_fit_reports_a_bad_dataset_line_in_one_line(tmp_path, monkeypatch):
    """Bug caught: a bad row reaching the user of `steerdiff fit` as a traceback, or as a
    message without the file and line."""
    from typer.testing import CliRunner

    import steerdiff.models as models
    from steerdiff.cli import app

    monkeypatch.setattr(models, "load_model", lambda spec, dtype, device: make_tiny("llama"))
    data = tmp_path / "d.jsonl"
    data.write_text(_lines(_rows(2)) + "[1, 2]\n")
    res = CliRunner().invoke(app, ["fit", "--data", str(data), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert line.startswith("error:") and "\n" not in line and "d.jsonl:3: a row must be" in line
    assert not (tmp_path / "o").exists()


def test_repair_keeps_complete_lines_byte_for_byte(tmp_path):
    """Bug caught: the resume's repair re-serialising every row (changing bytes), or
    leaving a complete last line without its newline (the next append glues two rows)."""
    p = tmp_path / "x.jsonl"
    p.write_text('{"id":0}\n{"id": 1,  "a":[1]}\n{"id": 2, "mess')
    assert repair_jsonl(p) and p.read_text() == '{"id":0}\n{"id": 1,  "a":[1]}\n'
    p.write_text('{"id":0}\n{"id":1}')
    assert repair_jsonl(p) and p.read_text() == '{"id":0}\n{"id":1}\n'
    assert not repair_jsonl(p) and p.read_text() == '{"id":0}\n{"id":1}\n'
    assert not repair_jsonl(tmp_path / "none.jsonl")
