"""VectorSet behaviour that mutation testing (bench/mutation.py) found untested.

Each test names the mutants of src/steerdiff/vectors.py it kills; each was made by hand
(or re-run with `mutmut run <name>`) and seen to fail. docs/testing.md has the counts.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import make_tiny
from safetensors.torch import save_file

from steerdiff.models import wrap_model
from steerdiff.vectors import VectorSet, VectorSetError


@pytest.fixture(scope="module")
def lm():
    return wrap_model(make_tiny("llama"), spec="tiny-llama", weights_hash="tinyhash")


def two(lm, seed: int = 0, **meta) -> VectorSet:
    g = torch.Generator().manual_seed(seed)
    vecs = {f"blocks.{i}.hook_resid_post": torch.randn(64, generator=g) for i in (1, 2)}
    return VectorSet.for_model(lm, vecs, **meta)


def test_arithmetic_keeps_the_left_sets_metadata_and_notes_the_op(lm):
    """Catches: sum/difference/scaling/negation/normalising that drop the metadata (model id,
    weights hash: a saved result would no longer say which model it fits), an op note
    mislabelled ("sum" for a difference), and `-a` computed as `a * -2`."""
    a, b = two(lm, 0, method="a"), two(lm, 1, method="b")
    assert (a + b).metadata == {**a.metadata, "derived": "sum of two sets"}
    assert (a - b).metadata == {**a.metadata, "derived": "difference of two sets"}
    for derived in (a * 3.0, 3.0 * a, -a, a.normalized(2.0)):
        assert derived.metadata == a.metadata
        assert derived.metadata is not a.metadata  # a copy: editing one leaves the other
    for k in a:
        torch.testing.assert_close((-a)[k], -a[k], rtol=0, atol=0)


def test_mismatched_hooks_error_names_the_hooks_that_differ(lm):
    """Catches: the error listing the hooks both sets have (intersection) instead of the
    ones that differ, so the user cannot see which hook is missing."""
    a = two(lm)
    b = VectorSet({"blocks.1.hook_resid_post": torch.zeros(64)})
    with pytest.raises(VectorSetError, match=r"different hooks: \['blocks\.2\.hook_resid_post'\]"):
        a + b


def test_normalized_rescales_short_vectors_and_keeps_zero_vectors_finite(lm):
    """Catches: a norm floor of 1 instead of 1e-12 (vectors shorter than 1 would not be
    scaled up), and a zero vector turned into NaN by the division."""
    vs = VectorSet({"blocks.1.hook_resid_post": torch.full((64,), 0.01), "z": torch.zeros(64)})
    out = vs.normalized(3.0)
    assert out.norms()["blocks.1.hook_resid_post"] == pytest.approx(3.0, rel=1e-6)
    torch.testing.assert_close(out["z"], torch.zeros(64), rtol=0, atol=0)


def test_cosine_of_sets_without_common_hooks_says_so():
    """Catches: the error raised without a message (or with another one)."""
    a = VectorSet({"blocks.1.hook_resid_post": torch.ones(4)})
    b = VectorSet({"blocks.2.hook_resid_post": torch.ones(4)})
    with pytest.raises(VectorSetError, match="^The two VectorSets share no hook points.$"):
        a.cosine(b)


def test_for_model_records_the_models_provenance(lm):
    """Catches: provenance keys misspelt or dropped (n_layers, model_type, steerdiff_version,
    model_id, weights_hash): later loads and reports read them by these names."""
    meta = two(lm, method="test").metadata
    assert meta["n_layers"] == 3 and meta["d_model"] == 64 and meta["model_type"] == "llama"
    assert meta["model_id"] == "tiny-llama" and meta["weights_hash"] == "tinyhash"
    assert meta["method"] == "test" and isinstance(meta["steerdiff_version"], str)


def test_fit_errors_name_the_model_the_set_was_made_for(lm):
    """Catches: the d_model and shape errors losing the model id they were made for (the
    half of the message that says which model to load instead)."""
    wide = VectorSet({"blocks.1.hook_resid_post": torch.zeros(64)}, {"d_model": 576})
    wide.metadata["model_id"] = "smol"
    with pytest.raises(VectorSetError, match=r"\(model 'smol'\)"):
        wide.check_fits(lm)
    short = VectorSet({"blocks.1.hook_resid_post": torch.zeros(8)}, {"model_id": "smol"})
    with pytest.raises(VectorSetError, match="the set was made for 'smol'"):
        short.check_fits(lm)


def test_save_creates_missing_folders_and_stringifies_odd_metadata(tmp_path):
    """Catches: `mkdir` without parents (saving to a new nested folder fails), the version
    stamp dropped for sets not made by `for_model`, and metadata values that JSON cannot
    encode (a Path) crashing the save instead of being written as strings."""
    vs = VectorSet({"blocks.1.hook_resid_post": torch.ones(4)}, {"data": Path("/d/x.jsonl")})
    path = vs.save(tmp_path / "new" / "deeper" / "v.safetensors")
    back = VectorSet.load(path)
    assert back.metadata["data"] == "/d/x.jsonl"
    assert isinstance(back.metadata["steerdiff_version"], str)
    torch.testing.assert_close(back["blocks.1.hook_resid_post"], torch.ones(4))


def test_load_reads_plain_safetensors_without_metadata(tmp_path):
    """Catches: a KeyError on safetensors files written by other tools (no steerdiff header)."""
    path = tmp_path / "plain.safetensors"
    save_file({"blocks.1.hook_resid_post": torch.arange(4.0)}, str(path))
    back = VectorSet.load(path)
    assert back.metadata == {}
    torch.testing.assert_close(back["blocks.1.hook_resid_post"], torch.arange(4.0))


def test_load_with_a_model_checks_the_fit(lm, tmp_path):
    """Catches: `load(path, model)` that skips the fit check (or runs it only without a model)."""
    path = VectorSet({"blocks.7.hook_resid_post": torch.zeros(64)}).save(tmp_path / "v.st")
    assert set(VectorSet.load(path)) == {"blocks.7.hook_resid_post"}
    with pytest.raises(VectorSetError, match="blocks.7.hook_resid_post"):
        VectorSet.load(path, model=lm)


def test_gguf_export_creates_folders_and_defaults_the_hint_to_the_model_type(lm, tmp_path):
    """Catches: `mkdir` without parents in the export, and a model hint that ignores the set's
    model_type (or falls back to something other than its model_id): llama.cpp prints the
    hint when a control vector is loaded onto another model."""
    path = two(lm).to_gguf_control_vector(tmp_path / "a" / "b" / "cv.gguf")
    back = VectorSet.from_gguf_control_vector(path)
    assert back.metadata == {"model_hint": "llama", "source": str(path)}
    only_id = VectorSet({"blocks.1.hook_resid_post": torch.ones(64)}, {"model_id": "my-model"})
    p2 = only_id.to_gguf_control_vector(tmp_path / "id.gguf")
    assert VectorSet.from_gguf_control_vector(p2).metadata["model_hint"] == "my-model"
    bare = VectorSet({"blocks.1.hook_resid_post": torch.ones(64)})
    p3 = bare.to_gguf_control_vector(tmp_path / "bare.gguf")
    # nothing known: an empty hint (gguf reads it back as absent), never "None"
    assert VectorSet.from_gguf_control_vector(p3).metadata["model_hint"] in (None, "")
    p4 = bare.to_gguf_control_vector(tmp_path / "hint.gguf", model_hint="qwen2")
    assert VectorSet.from_gguf_control_vector(p4).metadata["model_hint"] == "qwen2"


def test_gguf_reader_errors_name_the_file(tmp_path):
    """Catches: the not-found and wrong-architecture errors raised without a message."""
    missing = tmp_path / "none.gguf"
    with pytest.raises(VectorSetError, match=f"not found: {missing}"):
        VectorSet.from_gguf_control_vector(missing)
    model_file = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(model_file), "llama")
    w.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(VectorSetError, match=f"{model_file} has architecture 'llama'"):
        VectorSet.from_gguf_control_vector(model_file)


def test_repr_and_to(lm):
    """Catches: a repr that hides the hooks, shapes or model (what a notebook shows), and
    `to(dtype=...)` that drops the dtype or the metadata."""
    vs = two(lm)
    assert repr(vs) == (
        "VectorSet(blocks.1.hook_resid_post: (64,), blocks.2.hook_resid_post: (64,); "
        "model=tiny-llama)"
    )
    many = VectorSet({f"h{i}": torch.zeros(2) for i in range(6)})
    assert (
        repr(many) == "VectorSet(h0: (2,), h1: (2,), h2: (2,), h3: (2,), ... (6 hooks); model=None)"
    )
    half = vs.to(dtype=torch.float16)
    assert {v.dtype for v in half.values()} == {torch.float16} and half.metadata == vs.metadata
    torch.testing.assert_close(
        half["blocks.1.hook_resid_post"].float(),
        vs["blocks.1.hook_resid_post"],
        atol=1e-2,
        rtol=1e-3,
    )


def test_repr_elides_from_the_fifth_hook_and_normalized_defaults_to_unit_norm():
    """Catches: the "... (n hooks)" tail shown for four hooks or hidden for five, and a
    default norm other than 1 in `normalized()`."""
    four = VectorSet({f"h{i}": torch.ones(2) for i in range(4)})
    assert repr(four) == "VectorSet(h0: (2,), h1: (2,), h2: (2,), h3: (2,); model=None)"
    five = VectorSet({f"h{i}": torch.ones(2) for i in range(5)})
    assert repr(five).endswith(", ... (5 hooks); model=None)")
    assert four.normalized().norms() == pytest.approx({f"h{i}": 1.0 for i in range(4)})


def _cause(fn) -> str:
    """The underlying library's error message, on one line."""
    try:
        fn()
    except Exception as e:
        return " ".join(str(e).split())
    raise AssertionError("expected the library to fail")


def test_unreadable_files_report_the_readers_own_error(tmp_path):
    """Catches: the safetensors / gguf reader's error replaced by "None" (or its words run
    together) in the one-line message: that error is what tells a user how the file broke."""
    from safetensors import safe_open

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage" * 10)
    cause = _cause(lambda: safe_open(str(bad), framework="pt"))
    with pytest.raises(VectorSetError) as err:
        VectorSet.load(bad)
    assert cause in str(err.value) and len(cause.split()) > 1
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"not a gguf file at all")
    cause = _cause(lambda: gguf.GGUFReader(str(bad_gguf)))
    with pytest.raises(VectorSetError) as err:
        VectorSet.from_gguf_control_vector(bad_gguf)
    assert cause in str(err.value) and len(cause.split()) > 1
