"""VectorSet: io with metadata, arithmetic, fit checks, GGUF control-vector export."""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
import torch
from conftest import make_tiny

from steerdiff.hooks import HookError, NonFiniteError, steer
from steerdiff.models import wrap_model
from steerdiff.vectors import VectorSet, VectorSetError

H1, H2 = "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"


@pytest.fixture
def lm():
    return wrap_model(make_tiny("llama"), spec="tiny-llama")


def make_set(lm, seed=0) -> VectorSet:
    g = torch.Generator().manual_seed(seed)
    vecs = {
        "blocks.1.hook_resid_post": torch.randn(64, generator=g),
        "blocks.2.hook_resid_post": torch.randn(64, generator=g),
    }
    return VectorSet.for_model(lm, vecs, method="test", seed=seed)


def test_save_load_roundtrip_keeps_metadata(lm, tmp_path):
    vs = make_set(lm)
    path = vs.save(tmp_path / "v.safetensors")
    back = VectorSet.load(path, model=lm)
    assert set(back) == set(vs)
    for k in vs:
        assert torch.equal(back[k], vs[k])
    assert back.metadata["model_id"] == "tiny-llama"
    assert back.metadata["weights_hash"] == lm.weights_hash
    assert back.metadata["d_model"] == 64 and back.metadata["method"] == "test"
    assert "steerdiff_version" in back.metadata
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temp left behind


def test_arithmetic_and_cosine(lm):
    a, b = make_set(lm, 0), make_set(lm, 1)
    s = a + b
    d = a - b
    for k in a:
        torch.testing.assert_close(s[k], a[k] + b[k])
        torch.testing.assert_close(d[k], a[k] - b[k])
        torch.testing.assert_close((2 * a)[k], a[k] * 2)
        torch.testing.assert_close((a * -0.5)[k], -0.5 * a[k])
    for n in a.normalized(3.0).norms().values():
        assert n == pytest.approx(3.0, rel=1e-5)
    cos = a.cosine(a * 2.0)
    assert all(c == pytest.approx(1.0, abs=1e-6) for c in cos.values())
    assert a.cosine(-a)["blocks.1.hook_resid_post"] == pytest.approx(-1.0, abs=1e-6)
    exp = torch.nn.functional.cosine_similarity(
        a["blocks.2.hook_resid_post"], b["blocks.2.hook_resid_post"], dim=0
    )
    assert a.cosine(b)["blocks.2.hook_resid_post"] == pytest.approx(float(exp), abs=1e-6)


def test_mismatched_sets_raise(lm):
    a = make_set(lm)
    other = VectorSet({"blocks.0.hook_resid_post": torch.zeros(64)})
    with pytest.raises(VectorSetError, match="different hooks"):
        a + other


def test_vectorset_steers_like_a_dict(lm):
    """Bug caught: a VectorSet that steer reads differently from a dict (or not at all:
    then both runs equal the unsteered logits and a bare comparison would pass)."""
    vs = make_set(lm)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    base = lm.model(input_ids=ids).logits
    with steer(lm.model, vs, coeff=2.0):
        a = lm.model(input_ids=ids).logits
    with steer(lm.model, {k: 2.0 * v for k, v in vs.items()}):
        b = lm.model(input_ids=ids).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, base, atol=1e-3)


def test_set_helpers_and_their_errors(lm, tmp_path):
    """Bug caught: to() losing vectors or metadata, repr hiding the hooks, for_model not
    stamping the model, cosine over no shared hook, a GGUF of another architecture read
    as a control vector."""
    vs = make_set(lm)
    half = vs.to(dtype=torch.float16)
    assert half[H1].dtype == torch.float16 and half.metadata == vs.metadata
    torch.testing.assert_close(half[H1].float(), vs[H1], rtol=1e-3, atol=1e-3)
    assert repr(vs) == f"VectorSet({H1}: (64,), {H2}: (64,); model=tiny-llama)"
    assert {k: vs.metadata[k] for k in ("d_model", "n_layers", "model_type", "seed")} == {
        "d_model": 64,
        "n_layers": 3,
        "model_type": "llama",
        "seed": 0,
    }
    with pytest.raises(VectorSetError, match="share no hook points"):
        vs.cosine({"blocks.0.hook_resid_post": torch.ones(64)})
    with pytest.raises(VectorSetError, match="does not exist on this model"):
        VectorSet.for_model(lm, {"blocks.3.hook_resid_post": torch.ones(64)})
    other = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(other), "llama")
    w.add_tensor("direction.1", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(VectorSetError, match="architecture 'llama', not 'controlvector'"):
        VectorSet.from_gguf_control_vector(other)


def test_load_onto_wrong_model_says_which(lm, tmp_path):
    """Bug caught: check_fits refusing a set that does fit another family of the same width,
    or letting a wrong shape / missing hook / other d_model through."""
    vs = make_set(lm)
    path = vs.save(tmp_path / "v.safetensors")
    gpt2 = make_tiny("gpt2")  # also d_model 64 and 3 layers: the set fits it
    back = VectorSet.load(path, model=gpt2)
    assert all(torch.equal(back[k], vs[k]) for k in vs)
    bigger = VectorSet({"blocks.1.hook_resid_post": torch.zeros(32)}, {"model_id": "x"})
    with pytest.raises(VectorSetError, match=r"shape \(32,\), expected \(64,\)"):
        bigger.check_fits(lm)
    deep = VectorSet({"blocks.9.hook_resid_post": torch.zeros(64)}, {"model_id": "x"})
    with pytest.raises(VectorSetError, match="blocks.9.hook_resid_post.*does not exist"):
        deep.check_fits(lm)
    other_width = VectorSet(
        {"blocks.1.hook_resid_post": torch.zeros(64)}, {"d_model": 576, "model_id": "default"}
    )
    with pytest.raises(VectorSetError, match="d_model=576.*d_model=64"):
        other_width.check_fits(lm)


def test_load_missing_or_corrupt_file(tmp_path):
    with pytest.raises(VectorSetError, match="not found"):
        VectorSet.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(VectorSetError, match="not a readable safetensors"):
        VectorSet.load(bad)


def test_gguf_control_vector_roundtrip(lm, tmp_path):
    vs = make_set(lm)
    vs.vectors["blocks.2.hook_resid_pre"] = torch.ones(64)  # = blocks.1.hook_resid_post
    path = vs.to_gguf_control_vector(tmp_path / "cv.gguf", model_hint="llama")
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    hint = reader.fields["controlvector.model_hint"]
    assert bytes(hint.parts[hint.data[0]]).decode() == "llama"
    count = reader.fields["controlvector.layer_count"]
    assert int(count.parts[count.data[0]][0]) == 2
    names = sorted(t.name for t in reader.tensors)
    assert names == ["direction.1", "direction.2"]
    back = VectorSet.from_gguf_control_vector(path)
    np.testing.assert_allclose(
        back["blocks.1.hook_resid_post"].numpy(),
        (vs["blocks.1.hook_resid_post"] + 1.0).numpy(),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        back["blocks.2.hook_resid_post"].numpy(), vs["blocks.2.hook_resid_post"].numpy()
    )


def test_gguf_export_refuses_non_residual(lm, tmp_path):
    vs = VectorSet({"blocks.1.attn.hook_q": torch.zeros(64)})
    with pytest.raises(VectorSetError, match="not a residual-stream hook"):
        vs.to_gguf_control_vector(tmp_path / "cv.gguf")
    vs0 = VectorSet({"blocks.0.hook_resid_post": torch.zeros(64)})
    with pytest.raises(VectorSetError, match="layer 0"):
        vs0.to_gguf_control_vector(tmp_path / "cv.gguf")
    assert not (tmp_path / "cv.gguf").exists()


def test_gguf_reader_rejects_bad_files(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(VectorSetError, match="not a readable GGUF"):
        VectorSet.from_gguf_control_vector(bad)


def _nan_at(vs: VectorSet, hook: str, value: float = float("nan")) -> VectorSet:
    """The set with one entry of one vector made non-finite (bypassing construction)."""
    bad = vs.vectors[hook].clone()
    bad[3] = value
    vs.vectors[hook] = bad
    return vs


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_vectors_are_refused_everywhere(lm, tmp_path, value):
    """Bug caught: a NaN/Inf vector accepted by VectorSet(), save, load, the GGUF export or
    import (then `steer` gives all-NaN logits silently). Each error is one line naming the
    hook (and the file), and no file is written."""
    kind = "NaN" if value != value else "Inf"
    with pytest.raises(NonFiniteError, match=rf"{H2} holds .*{kind}"):
        VectorSet({H1: torch.ones(64), H2: torch.full((64,), value)})
    out = tmp_path / "v.safetensors"
    with pytest.raises(
        NonFiniteError, match=rf"{H2} to be saved to {re.escape(str(out))} holds"
    ) as e:
        _nan_at(make_set(lm), H2, value).save(out)
    assert "\n" not in str(e.value) and not out.exists() and not list(tmp_path.iterdir())
    cv = tmp_path / "cv.gguf"
    with pytest.raises(NonFiniteError, match=rf"{H2} to be exported to {re.escape(str(cv))}"):
        _nan_at(make_set(lm), H2, value).to_gguf_control_vector(cv)
    assert not cv.exists() and not list(tmp_path.iterdir())
    # files written by other tools: safetensors, and a llama.cpp control vector
    from safetensors.torch import save_file

    save_file(dict(_nan_at(make_set(lm), H1, value).items()), str(out))
    with pytest.raises(NonFiniteError, match=rf"{H1} in {re.escape(str(out))} holds"):
        VectorSet.load(out, model=lm)
    w = gguf.GGUFWriter(str(cv), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 1)
    w.add_tensor("direction.1", np.full(64, value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(NonFiniteError, match=rf"{H1} in {re.escape(str(cv))} holds"):
        VectorSet.from_gguf_control_vector(cv)


def test_vectors_as_lists_and_numpy_arrays(lm):
    """Bug caught: a list or numpy vector raising AttributeError in VectorSet or steer."""
    v = torch.randn(64, generator=torch.Generator().manual_seed(4))
    as_list = VectorSet({H1: v.tolist()})
    as_np = VectorSet({H1: v.double().numpy()})
    for vs in (as_list, as_np):
        assert vs[H1].dtype == torch.float32 and torch.equal(vs[H1], v)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    with steer(lm.model, {H1: v}):
        want = lm.model(input_ids=ids).logits
    for given in (v.tolist(), v.numpy(), as_np):
        with steer(lm.model, given if isinstance(given, VectorSet) else {H1: given}):
            torch.testing.assert_close(lm.model(input_ids=ids).logits, want, rtol=0, atol=0)
    with pytest.raises(HookError, match=rf"vector for {H1} is a str; give a torch tensor"):
        VectorSet({H1: "0.1 0.2"})


def test_broken_header_metadata_is_one_line_naming_the_file(tmp_path):
    """Bug caught: json.loads of the header's metadata escaping as a JSONDecodeError
    traceback (52 lines from the CLI) instead of a VectorSetError naming the file."""
    from safetensors.torch import save_file

    path = tmp_path / "v.safetensors"
    for meta, why in (("{broken", "not valid JSON"), ("[1, 2]", "a list, not a JSON object")):
        save_file({H1: torch.ones(64)}, str(path), metadata={"steerdiff": meta})
        with pytest.raises(
            VectorSetError, match=rf"{re.escape(str(path))}: the 'steerdiff' metadata"
        ) as e:
            VectorSet.load(path)
        assert why in str(e.value) and "Save the set again" in str(e.value)
        assert "\n" not in str(e.value)


def test_truncated_file_is_one_line_naming_the_file(lm, tmp_path):
    """Bug caught: a file cut short (interrupted copy) giving a traceback or no fix."""
    path = make_set(lm).save(tmp_path / "v.safetensors")
    data = path.read_bytes()
    for cut in (len(data) // 2, 10):
        path.write_bytes(data[:cut])
        with pytest.raises(
            VectorSetError, match=rf"{re.escape(str(path))} is not a readable safetensors"
        ) as e:
            VectorSet.load(path)
        assert "copy it again" in str(e.value) and "\n" not in str(e.value)


def test_cli_generate_with_a_nan_vector_file_fails_at_load(tmp_path):
    """Bug caught: `generate --teacher steered` with a NaN vector file sampling junk and
    reporting "truncated ... try constrained decoding". It stops before sampling with one
    line naming the file and the hook, and no dataset is written."""
    from _read_helpers import one_line_error, tiny_model_folder
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from steerdiff.cli import app

    folder = tiny_model_folder(tmp_path / "m")
    path = tmp_path / "nan.safetensors"
    save_file({H2: torch.full((64,), float("nan"))}, str(path))
    data = tmp_path / "d.jsonl"
    args = ["generate", "--out", str(data), "--teacher", "steered", "--vectors", str(path)]
    r = CliRunner().invoke(app, [*args, "--model", str(folder), "--n-prompts", "2"])
    line = one_line_error(r)
    assert f"{H2} in {path} holds 64 NaN" in line and "truncated" not in r.output
    assert not data.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "m",
        "nan.safetensors",
    ]
