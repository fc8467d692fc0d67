"""Pipeline stages: cached by content, resumable after a kill, published atomically."""

from __future__ import annotations

import pytest

from steerdiff.io import append_jsonl, read_jsonl
from steerdiff.pipeline.stages import run_stage, stage_key


def test_stage_runs_once_and_caches(tmp_path):
    calls = []

    def fn(work):
        calls.append(1)
        (work / "out.txt").write_text("hi")
        return {"n": 1}

    a = run_stage(tmp_path, "gen", {"x": 1}, fn)
    b = run_stage(tmp_path, "gen", {"x": 1}, fn)
    assert len(calls) == 1 and not a.cached and b.cached
    assert a.path == b.path and (a.path / "out.txt").read_text() == "hi"
    assert b.info == {"n": 1}
    c = run_stage(tmp_path, "gen", {"x": 2}, fn)  # a changed setting runs again
    assert len(calls) == 2 and c.path != a.path


def test_stage_key_is_order_independent():
    assert stage_key({"a": 1, "b": [1, 2]}) == stage_key({"b": [1, 2], "a": 1})
    assert stage_key({"a": 1}) != stage_key({"a": 2})


def test_interrupted_stage_resumes_without_duplicates(tmp_path):
    """A stage killed halfway keeps its partial folder; the rerun continues it."""

    def make_fn(crash_after: int | None):
        def fn(work):
            path = work / "rows.jsonl"
            done = {r["id"] for r in read_jsonl(path)} if path.exists() else set()
            for i in range(10):
                if i in done:
                    continue
                if crash_after is not None and i == crash_after:
                    raise KeyboardInterrupt
                append_jsonl(path, [{"id": i}])
            return {"rows": 10}

        return fn

    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, "gen", {}, make_fn(crash_after=6))
    partial = list(tmp_path.glob("gen-*.partial"))
    assert len(partial) == 1 and not list(tmp_path.glob("gen-*[!l]/stage.json"))
    res = run_stage(tmp_path, "gen", {}, make_fn(crash_after=None))
    ids = [r["id"] for r in read_jsonl(res.path / "rows.jsonl")]
    assert ids == list(range(10))
    assert not list(tmp_path.glob("*.partial"))


def test_a_stage_that_fails_before_any_progress_leaves_no_folder(tmp_path):
    """Bug: a stage that raised at its start left an empty `{name}-{key}.partial` folder,
    which looks like progress (a fit with a bad hook left `fit-*.partial`). A failure
    removes the folder unless `has_progress` says it holds something to resume from."""

    def fails(work):
        (work / "config.json").write_text("{}")  # written first, not progress
        raise ValueError("bad setting")

    with pytest.raises(ValueError, match="bad setting"):
        run_stage(tmp_path, "fit", {}, fails, has_progress=lambda w: (w / "ckpt").exists())
    with pytest.raises(ValueError, match="bad setting"):
        run_stage(
            tmp_path, "gen", {}, lambda work: (_ for _ in ()).throw(ValueError("bad setting"))
        )
    assert list(tmp_path.iterdir()) == []

    def fails_after_a_checkpoint(work):
        (work / "ckpt").write_text("step 3")
        raise ValueError("nan loss")

    with pytest.raises(ValueError, match="nan loss"):
        run_stage(
            tmp_path,
            "fit",
            {},
            fails_after_a_checkpoint,
            has_progress=lambda w: (w / "ckpt").exists(),
        )
    (kept,) = tmp_path.iterdir()  # the checkpoint a rerun resumes from stays
    assert kept.name == f"fit-{stage_key({'stage': 'fit', 'depends_on': {}})}.partial"
    assert (kept / "ckpt").read_text() == "step 3"
    # a kill (KeyboardInterrupt here) keeps the folder whatever it holds: the rerun resumes
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, "read", {}, lambda work: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["fit", "read"]
