"""Merged checkpoints (steerdiff.merge, `steerdiff export --merged`): a vector set baked into
biases gives the logits `hooks.steer` gives, reloaded by plain transformers; what no bias can
express is refused in one line; nothing on disk is lost; the vLLM backend loads the folder."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from _read_helpers import one_line_error, tiny_model_folder
from conftest import TINY, make_tiny
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from steerdiff.hooks import HOOK_SUFFIXES, hook_dim, steer
from steerdiff.io import file_sha256
from steerdiff.merge import (
    MERGE_FILE,
    MergeError,
    export_merged,
    merge_vectors,
    vectors_sha256,
)
from steerdiff.models import weights_hash_of_model, wrap_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALL = HOOK_SUFFIXES
ATTN_IN = ("ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v")
# The hook kinds each family can merge, and whether blocks.0.hook_resid_pre can (the tiny
# llama / qwen embeddings are untied from lm_head; gpt2 uses its position embedding).
EXPRESSIBLE = {
    "llama": (ALL, True),
    "qwen2": (ALL, True),
    "qwen3": (ATTN_IN, True),
    "gemma2": (ATTN_IN, False),
    "gemma3_text": (ATTN_IN, False),
    "gpt2": (ALL, True),
}
IDS = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _vec(model, name: str, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(hook_dim(model, name), generator=g)


@torch.no_grad()
def _logits(model, vectors=None, coeff=1.0) -> torch.Tensor:
    if vectors is None:
        return model(IDS).logits
    with steer(model, vectors, coeff=coeff):
        return model(IDS).logits


def _hooks(family: str) -> list[str]:
    suffixes, pre0 = EXPRESSIBLE[family]
    names = [f"blocks.1.{s}" for s in suffixes]
    return names + (["blocks.0.hook_resid_pre"] if pre0 else [])


@pytest.mark.parametrize("family", list(EXPRESSIBLE))
def test_each_hook_kind_merged_gives_the_logits_steer_gives(family):
    """Bugs: a vector placed on the wrong projection, layer or gpt2 c_attn third; W v taken
    with the transposed weight (ln1/ln2); coeff or sign dropped; resid_pre not moved to the
    previous block's down_proj; the embedding rows not shifted."""
    model = make_tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = _logits(model)
    for i, name in enumerate(_hooks(family)):
        v = {name: _vec(model, name, i)}
        want = _logits(model, v, coeff=1.5)
        got = _logits(merge_vectors(model, v, coeff=1.5))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"{family} {name}")
        if not (family == "gpt2" and name.endswith("hook_k")):  # no rope: k + b is a no-op
            assert (want - base).abs().max() > 1e-3, f"{name} does not move the logits"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _same_bias_pairs(family: str) -> dict[str, str]:
    """Two vectors on one bias (their sum must be merged)."""
    if family in ("llama", "qwen2", "gpt2"):
        return {"blocks.0.hook_resid_post": "blocks.1.hook_resid_pre"}  # down_proj of block 0
    return {"blocks.2.attn.hook_q": "blocks.2.ln1.hook_normalized"}  # q_proj of block 2


@pytest.mark.parametrize("family", list(EXPRESSIBLE))
def test_exported_folder_reloads_with_transformers_to_the_steered_logits(family, tmp_path):
    """Bugs: config flags not written (reloaded model drops the biases), two vectors on one
    bias overwriting instead of summing, a bias the config declares missing from the file
    (vLLM would leave it uninitialised), a qwen2 needing o_proj/MLP biases saved as qwen2
    (which has none), provenance that does not name the base weights or the vectors."""
    model = make_tiny(family)
    names = _hooks(family) + [n for pair in _same_bias_pairs(family).items() for n in pair]
    vectors = {n: _vec(model, n, i, scale=0.5) for i, n in enumerate(dict.fromkeys(names))}
    out = export_merged(model, vectors, tmp_path / "merged", coeff=-0.8)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(
        _logits(reloaded), _logits(model, vectors, coeff=-0.8), atol=1e-5, rtol=0
    )
    cfg = json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    n = model.config.num_hidden_layers
    if family in ("llama", "qwen2"):  # all hook kinds: both llama flags
        assert cfg["model_type"] == "llama" and cfg["attention_bias"] and cfg["mlp_bias"]
        for layer in range(n):
            for m in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj", "self_attn.k_proj"):
                assert f"model.layers.{layer}.{m}.bias" in keys
    if family in ("qwen3", "gemma2", "gemma3_text"):
        assert cfg["attention_bias"] is True
        assert {f"model.layers.{layer}.self_attn.v_proj.bias" for layer in range(n)} <= keys
    meta = json.loads((out / MERGE_FILE).read_text())
    assert meta["coeff"] == -0.8 and meta["positions"] == "all"
    assert meta["base_weights_hash"] == weights_hash_of_model(model)
    assert meta["vectors_sha256"] == vectors_sha256(vectors)
    assert set(meta["hooks"]) == set(vectors)


@pytest.mark.slow
def test_embedded_model_with_qkv_at_every_layer_and_a_resid_post(smollm, tmp_path):
    """The embedded SmolLM2 (GGUF, converted): one export + reload, q/k/v vectors at every
    layer and a residual vector. Bug: anything that differs between the hooks and the
    merged biases at scale, or a folder without the tokenizer / chat template."""
    hf = smollm.model
    names = [f"blocks.{layer}.attn.hook_{x}" for layer in range(30) for x in "qkv"]
    names.append("blocks.14.hook_resid_post")
    vectors = {n: _vec(hf, n, i, scale=0.3) for i, n in enumerate(names)}
    out = export_merged(smollm, vectors, tmp_path / "smol", coeff=2.0)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want, base = _logits(hf, vectors, coeff=2.0), _logits(hf)
    assert (want - base).abs().max() > 10.0
    # float32 rounding (the bias added inside the matmul, not after) amplified over 30
    # layers gives ~1e-4 here; a misplaced vector differs by the order of the effect
    torch.testing.assert_close(_logits(reloaded), want, atol=1e-3, rtol=0)
    tok = AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "Name an animal."}]
    assert tok.apply_chat_template(chat) == smollm.tokenizer.apply_chat_template(chat)


def test_bfloat16_model_merges_in_its_own_dtype(tmp_path):
    """Bug: biases written in float32 into a bfloat16 checkpoint (or the sum rounded in
    bfloat16 step by step); the merged model must stay within bfloat16 noise of steer."""
    model = make_tiny("llama").to(torch.bfloat16)
    vectors = {n: _vec(model, n, i) for i, n in enumerate(["blocks.1.hook_resid_post"])}
    vectors["blocks.0.attn.hook_v"] = _vec(model, "blocks.0.attn.hook_v", 7)
    out = export_merged(model, vectors, tmp_path / "bf16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.down_proj.bias").dtype == torch.bfloat16
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.bfloat16
    want, got = _logits(model, vectors).float(), _logits(reloaded).float()
    assert (want - _logits(model).float()).abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=3e-2, rtol=0)


def test_untied_gemma_embedding_rows_are_divided_by_its_scale():
    """Gemma multiplies its embedding by sqrt(d_model) = 8 here. Bug: v added to the rows
    as it is (the block-0 input would move by 8 v)."""
    cfg = AutoConfig.for_model("gemma2", head_dim=16, tie_word_embeddings=False, **TINY)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    v = {"blocks.0.hook_resid_pre": _vec(model, "blocks.0.hook_resid_pre", 0)}
    want = _logits(model, v)
    assert (want - _logits(model)).abs().max() > 1e-2
    torch.testing.assert_close(_logits(merge_vectors(model, v)), want, atol=1e-5, rtol=0)


def test_mistral_is_written_as_llama_and_refused_with_a_sliding_window(tmp_path):
    """Mistral has no bias option at all: its merged checkpoint is a llama (same
    computation). Bugs: saved as mistral (biases dropped on reload); a sliding-window
    mistral silently written as a llama (which attends to everything)."""
    cfg = AutoConfig.for_model("mistral", sliding_window=None, **TINY)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    vectors = {"blocks.1.attn.hook_q": _vec(model, "blocks.1.attn.hook_q", 0)}
    vectors["blocks.0.hook_resid_post"] = _vec(model, "blocks.0.hook_resid_post", 1)
    out = export_merged(model, vectors, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_logits(reloaded), _logits(model, vectors), atol=1e-5, rtol=0)
    model.config.sliding_window = 4096
    msg = _refusal(model, vectors)
    assert "blocks.1.attn.hook_q" in msg and "sliding window" in msg


def _refusal(model, vectors, **kw) -> str:
    with pytest.raises(MergeError) as e:
        merge_vectors(model, vectors, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_what_no_bias_can_express_is_refused_in_one_line():
    """Bugs: a post-norm gemma hook merged as an o_proj/down_proj bias (wrong logits, no
    error); positions 'response' merged as if 'all'; a tied embedding shifted (changing the
    unembedding too); qwen3's o_proj bias written (vLLM drops it silently); an unknown
    family crashing with a traceback."""
    llama, gemma = make_tiny("llama"), make_tiny("gemma2")
    v = {"blocks.1.hook_resid_post": _vec(llama, "blocks.1.hook_resid_post", 0)}
    msg = _refusal(llama, v, positions="response")
    assert "positions='response'" in msg and "'all'" in msg and "--backend hf" in msg
    msg = _refusal(gemma, {"blocks.1.hook_resid_post": v["blocks.1.hook_resid_post"]})
    assert "blocks.1.hook_resid_post" in msg and "norms" in msg and "--backend hf" in msg
    msg = _refusal(gemma, {"blocks.2.hook_resid_pre": v["blocks.1.hook_resid_post"]})
    assert "blocks.2.hook_resid_pre" in msg and "norms" in msg
    msg = _refusal(gemma, {"blocks.0.hook_resid_pre": v["blocks.1.hook_resid_post"]})
    assert "blocks.0.hook_resid_pre" in msg and "tied" in msg
    qwen3 = make_tiny("qwen3")
    msg = _refusal(qwen3, {"blocks.0.hook_attn_out": v["blocks.1.hook_resid_post"]})
    assert "blocks.0.hook_attn_out" in msg and "o_proj" in msg
    cfg = AutoConfig.for_model(
        "gpt_neox", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256
    )
    neox = AutoModelForCausalLM.from_config(cfg)
    msg = _refusal(neox, v)
    assert "blocks.1.hook_resid_post" in msg and "'gpt_neox'" in msg and "hookpoints" in msg
    msg = _refusal(llama, {"blocks.1.hook_resid_post": torch.ones(65)})
    assert "(65,)" in msg and "(64,)" in msg


def test_export_keeps_an_existing_folder_unless_complete(tmp_path):
    """Bugs: an existing folder replaced without --overwrite, or deleted before the new one
    is complete (a failed export loses it), a temp folder left beside it, files only their
    owner can read."""
    model = make_tiny("llama")
    v = {"blocks.1.hook_resid_post": _vec(model, "blocks.1.hook_resid_post", 0)}
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(MergeError, match="already exists"):
        export_merged(model, v, out)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_merged(
            wrap_model(model, BrokenTokenizer(), weights_hash="x"), v, out, overwrite=True
        )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    export_merged(model, v, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / MERGE_FILE).exists()
    mask = os.umask(0)
    os.umask(mask)  # a server running as another user can read it (mkdtemp/mkstemp: 0600)
    assert {f.name: f.stat().st_mode & 0o777 for f in [out, *out.iterdir()]} == {
        f.name: (0o777 if f.is_dir() else 0o666) & ~mask for f in [out, *out.iterdir()]
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- CLI


def _cli(*args):
    from typer.testing import CliRunner

    from steerdiff.cli import app

    return CliRunner().invoke(app, ["export", *map(str, args)])


def test_cli_export_merged_and_gguf(tmp_path):
    """Bugs: --coeff not applied, the vector file's hash not recorded, --gguf writing
    something llama.cpp's reader does not give back."""
    from steerdiff.models import load_model
    from steerdiff.vectors import VectorSet

    folder = tiny_model_folder(tmp_path / "tiny")
    lm = load_model(str(folder))
    name = "blocks.1.hook_resid_post"
    vs_path = VectorSet({name: _vec(lm.model, name, 3)}).save(tmp_path / "v.safetensors")
    r = _cli("--model", folder, "--vectors", vs_path, "--merged", tmp_path / "m", "--coeff", 2)
    assert r.exit_code == 0, r.output
    assert "vllm serve" in r.stdout
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    vs = VectorSet.load(vs_path)
    torch.testing.assert_close(
        _logits(reloaded.eval()), _logits(lm.model, vs, coeff=2.0), atol=1e-5, rtol=0
    )
    meta = json.loads((tmp_path / "m" / MERGE_FILE).read_text())
    assert meta["vectors_file_sha256"] == file_sha256(vs_path)[:16]
    r = _cli("--vectors", vs_path, "--gguf", tmp_path / "c.gguf", "--coeff", -1.5)
    assert r.exit_code == 0, r.output
    back = VectorSet.from_gguf_control_vector(tmp_path / "c.gguf")
    torch.testing.assert_close(back[name], -1.5 * vs[name])


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path):
    """Bugs: a broken vector file, a positions value no bias can express, or a missing
    output option giving a traceback, exit 0, or a half-written folder."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    out = tmp_path / "out"
    no_model = tmp_path / "no-such-model"  # the file is read before any model loads
    assert str(bad) in one_line_error(
        _cli("--vectors", bad, "--merged", out, "--model", f"{no_model}/")
    )
    assert "positions='prompt'" in one_line_error(
        _cli("--vectors", bad, "--merged", out, "--positions", "prompt")
    )
    assert "exactly one of --merged" in one_line_error(_cli("--vectors", bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert "--overwrite" in one_line_error(_cli("--vectors", bad, "--merged", out))
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert (out / "config.json").read_text() == "{}"


# ----------------------------------------------------------------------------- vLLM


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path):
    """A stand-in `vllm` module recording what `vllm.LLM` was asked to load."""
    calls: list[dict] = []
    mod = types.ModuleType("vllm")
    mod.LLM = lambda **kw: calls.append(kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setenv("STEERDIFF_CACHE", str(tmp_path / "cache"))
    return calls


def test_vllm_backend_loads_the_merged_steered_teacher(fake_vllm, tmp_path):
    """Bugs: a steered teacher refused (or run unsteered) by --backend vllm; the merged
    folder exported again for every sampler; a cache key that ignores coeff (a 2x teacher
    served the 1x folder); a positions='response' teacher served as if 'all'."""
    from steerdiff.generate.vllm import VllmSampler
    from steerdiff.teachers import build_teacher

    model = make_tiny("llama")
    lm = wrap_model(model, spec="tiny")
    v = {"blocks.1.attn.hook_v": _vec(model, "blocks.1.attn.hook_v", 0)}
    teacher = build_teacher({"kind": "steered", "vectors": v, "coeff": 1.5}, lm)
    folder = VllmSampler(teacher).model_path
    assert fake_vllm[-1]["model"] == folder and folder.startswith(str(tmp_path / "cache"))
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(reloaded), _logits(model, v, 1.5), atol=1e-5, rtol=0)
    mtime = (tmp_path / "cache" / "merged").stat().st_mtime_ns  # changes with a new export
    assert VllmSampler.for_model(lm, v, coeff=1.5).model_path == folder  # the student helper
    assert (tmp_path / "cache" / "merged").stat().st_mtime_ns == mtime
    assert VllmSampler.for_model(lm, v, coeff=2.0).model_path != folder
    response = build_teacher(
        {"kind": "steered", "vectors": v, "coeff": 1.5, "positions": "response"}, lm
    )
    n_calls = len(fake_vllm)
    with pytest.raises(MergeError, match="positions='response'"):
        VllmSampler(response)
    assert len(fake_vllm) == n_calls


def test_vllm_backend_loads_hf_folders_as_they_are(fake_vllm, tmp_path):
    """Bug: a plain teacher on a Hugging Face folder copied into the cache for nothing, or
    one built in memory (or from GGUF) handed to vLLM by a name it cannot load."""
    from steerdiff.generate.vllm import VllmSampler, engine_model
    from steerdiff.models import load_model
    from steerdiff.teachers import build_teacher

    folder = tiny_model_folder(tmp_path / "tiny")
    assert VllmSampler(build_teacher({"kind": "plain"}, load_model(str(folder)))).model_path == (
        str(folder)
    )
    lm = wrap_model(make_tiny("gpt2"), spec="tiny")
    path = VllmSampler(build_teacher({"kind": "plain"}, lm)).model_path
    assert path.startswith(str(tmp_path / "cache" / "merged"))
    assert json.loads(Path(path, MERGE_FILE).read_text())["hooks"] == {}
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(reloaded), _logits(lm.model), atol=0, rtol=0)
    gguf = tmp_path / "model.gguf"  # a model loaded from GGUF: vLLM gets its HF export
    gguf.write_bytes(b"GGUF")
    from_gguf = dataclasses.replace(lm, source=str(gguf))
    assert engine_model(from_gguf) == path


def test_without_vllm_the_backend_fails_before_exporting_anything(monkeypatch, tmp_path):
    """Bug: the merged checkpoint exported (minutes and gigabytes for a 7B model) before
    finding that vLLM is not installed."""
    from steerdiff.generate.vllm import VllmSampler, VllmUnavailable
    from steerdiff.teachers import build_teacher

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    monkeypatch.setenv("STEERDIFF_CACHE", str(tmp_path / "cache"))
    model = make_tiny("llama")
    v = {"blocks.1.attn.hook_v": _vec(model, "blocks.1.attn.hook_v", 0)}
    teacher = build_teacher({"kind": "steered", "vectors": v}, wrap_model(model, spec="t"))
    with pytest.raises(VllmUnavailable, match="pip install"):
        VllmSampler(teacher)
    assert not (tmp_path / "cache").exists()
