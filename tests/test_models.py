"""Model loading: embedded default, GGUF checks and cache, hub fail-fast, helpful errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import steerdiff.models as models
from steerdiff.hooks import family_of
from steerdiff.models import ModelLoadError, load_model, resolve_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "missing.gguf")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(bad)


def test_truncated_gguf(tmp_path):
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00")
    with pytest.raises(ModelLoadError):
        load_model(bad)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)


def test_unreachable_hub_id_names_the_way_out(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(ModelLoadError, match=r"hub.*embedded default"):
        load_model("some-org/some-model-that-is-not-cached")


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "hub-unreachable"])
def test_unknown_hub_id_without_network_is_one_line(offline, monkeypatch, caplog, tmp_path):
    """Bug caught: `info no-such-model` on a machine without network printed 22 hub-retry
    lines (and took a minute) before its error. Offline mode must not ask the hub at all;
    an unreachable hub gets one request (no retries). Either way: exit 2, one line saying
    what to do. (Mutation tried: no hub_cache_only call -> transformers' own error in
    offline mode; "Retrying in 1s [Retry 1/5]" ... records and another error otherwise.)"""
    import logging

    import huggingface_hub
    from typer.testing import CliRunner

    from steerdiff.cli import app

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # refused
    caplog.set_level(logging.DEBUG)
    res = CliRunner().invoke(app, ["info", "--model", "no-such-model"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1, lines
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]
    assert lines[0].startswith("error: 'no-such-model' is no local file or folder")
    assert "embedded default" in lines[0] and "local model folder or .gguf" in lines[0]
    if offline:
        assert "HF_HUB_OFFLINE is set" in lines[0] and "hub was not asked" in lines[0]
    else:
        assert "hub could not be reached (ConnectError: " in lines[0]
        assert "connect this machine to the network" in lines[0]


def test_hub_answers_decide_where_a_hub_id_loads_from(monkeypatch, tmp_path):
    """The one hub request's outcomes: not found / gated -> one line saying what to do;
    unreachable but cached -> the Hugging Face cache only (no error); answered -> as usual.
    Bugs caught: a cached model refused when the network is down (mutation tried:
    `if cached: return True` removed -> ModelLoadError), a gated repo reported as missing."""
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    response = SimpleNamespace(headers={}, status_code=404, request=None, url="u")
    outcome: dict = {}

    def model_info(self, repo_id, timeout=None):
        assert timeout == models.HUB_TIMEOUT_S
        if outcome["raise"] is not None:
            raise outcome["raise"]

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(
        huggingface_hub, "try_to_load_from_cache", lambda repo, f: outcome["cached"]
    )
    cases = [
        (RepositoryNotFoundError("404", response=response), "No model 'org/m' on the Hugging"),
        (GatedRepoError("403", response=response), "'org/m' is gated on the Hugging Face hub"),
        (ConnectionError("no route"), "could not be reached (ConnectionError: no route)"),
    ]
    for error, message in cases:
        outcome.update({"raise": error, "cached": None})
        with pytest.raises(ModelLoadError) as info:
            models.hub_cache_only("org/m")
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    outcome.update({"raise": ConnectionError("no route"), "cached": str(tmp_path / "config.json")})
    assert models.hub_cache_only("org/m") is True  # cached: load without the hub
    outcome.update({"raise": None, "cached": None})
    assert models.hub_cache_only("org/m") is False  # the hub answered: load as usual


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="Unknown dtype"):
        load_model("default", dtype="float8")


def test_local_folder_roundtrip(tmp_path):
    from conftest import make_tiny

    model = make_tiny("qwen2")
    model.save_pretrained(tmp_path / "m")
    kind, loc, _ = resolve_spec(tmp_path / "m")
    assert kind == "folder"
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 256, (1, 4))
    torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.slow
def test_embedded_default(smollm):
    cfg = smollm.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert family_of(smollm.model).name == "llama"
    # sha256 of the embedded GGUF file: a change of hashing would orphan every cache and
    # make old provenance records look like another model
    assert smollm.weights_hash == "bf8f0ce711d1536a"
    assert smollm.tokenizer.chat_template and "<|im_start|>" in smollm.tokenizer.chat_template
    prov = smollm.provenance()
    assert prov["model_id"] == "default" and prov["weights_hash"] == smollm.weights_hash
    # it is a real language model: a common continuation gets high probability
    ids = smollm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    top = smollm.model(input_ids=ids).logits[0, -1].argmax()
    assert "Paris" in smollm.tokenizer.decode(top)


@pytest.mark.slow
def test_bfloat16_load(smollm):
    """bfloat16 is the same model, rounded: next-token distributions within 0.01 nats (KL)
    of float32 and the same top token; the weights hash is the file's, as in float32."""
    lm = load_model("default", dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert lm.weights_hash == smollm.weights_hash
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        lp16 = lm.model(input_ids=ids).logits[0].float().log_softmax(-1)
        lp32 = smollm.model(input_ids=ids).logits[0].log_softmax(-1)
    kl = (lp32.exp() * (lp32 - lp16)).sum(-1)  # [pos]
    assert kl.max() < 0.01, kl
    assert lp16[-1].argmax() == lp32[-1].argmax()


@pytest.mark.slow
def test_embedded_gemma3_second_family():
    from steerdiff.hooks import final_norm, record

    lm = load_model("gemma3-270m")
    cfg = lm.model.config
    assert (
        cfg.model_type == "gemma3_text" and cfg.num_hidden_layers == 18 and cfg.hidden_size == 640
    )
    assert family_of(lm.model).name == "gemma"
    ids = lm.tokenizer("The quick brown fox jumps over the", return_tensors="pt").input_ids
    with record(lm.model, "blocks.{8,17}.hook_resid_post") as rec:
        out = lm.model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(
        rec["blocks.8.hook_resid_post"], out.hidden_states[9], rtol=0, atol=0
    )
    torch.testing.assert_close(
        final_norm(lm.model)(rec["blocks.17.hook_resid_post"]),
        out.hidden_states[18],
        rtol=0,
        atol=0,
    )
    assert "lazy" in lm.tokenizer.decode(out.logits[0, -1].argmax())


# ----------------------------------------------------------------------------- GGUF cache


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet (one printable character per byte)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path, seed: int = 0, hidden: int = 16, layers: int = 2) -> dict:
    """A tiny llama GGUF file (float32 tensors, a 262-token byte-level BPE vocabulary and a
    chat template): what `load_model(path)` dequantises in well under a second."""
    import gguf

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_chars(), "Ġw", "or", "ld"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(2 * hidden)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hidden // 2)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["Ġ w", "o r", "l d"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    g = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (0.1 * g.standard_normal(shape)).astype(np.float32)

    hd, ones = hidden // 2, np.ones(hidden, np.float32)
    tensors = {"token_embd.weight": rand(len(tokens), hidden), "output_norm.weight": ones}
    for i in range(layers):
        b = f"blk.{i}."
        tensors |= {
            b + "attn_norm.weight": ones,
            b + "ffn_norm.weight": ones,
            b + "attn_q.weight": rand(hidden, hidden),
            b + "attn_k.weight": rand(hd, hidden),
            b + "attn_v.weight": rand(hd, hidden),
            b + "attn_output.weight": rand(hidden, hidden),
            b + "ffn_gate.weight": rand(2 * hidden, hidden),
            b + "ffn_up.weight": rand(2 * hidden, hidden),
            b + "ffn_down.weight": rand(hidden, 2 * hidden),
        }
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_gguf_is_dequantised_once_and_the_cache_reused(tmp_path, monkeypatch):
    """README claim: a .gguf is converted once and cached; the next load reuses the cache.
    Bugs caught: re-converting on every load (mutation tried: no early return in
    _converted_gguf_folder -> 2 conversions, the cached file rewritten), or a cache keyed by
    the path alone, serving stale weights after the file changed (mutation tried: key by
    path -> the third load returns the first file's weights)."""
    monkeypatch.setenv("STEERDIFF_CACHE", str(tmp_path / "cache"))
    real = models.AutoModelForCausalLM
    conversions = []

    class Spy:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            if "gguf_file" in kwargs:
                conversions.append(kwargs["gguf_file"])
            return real.from_pretrained(*args, **kwargs)

    monkeypatch.setattr(models, "AutoModelForCausalLM", Spy)
    path = tmp_path / "tiny.gguf"
    written = write_tiny_gguf(path)
    first = load_model(path, dtype="float32")  # bit-equal to the file's float32
    folders = list((tmp_path / "cache" / "gguf-converted").iterdir())
    assert conversions == ["tiny.gguf"] and [f.name for f in folders] == [first.weights_hash]
    weights = folders[0] / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    second = load_model(path, dtype="float32")
    assert conversions == ["tiny.gguf"]  # not converted again
    assert weights.stat().st_mtime_ns == stamp
    assert second.weights_hash == first.weights_hash
    assert list((tmp_path / "cache" / "gguf-converted").iterdir()) == folders
    emb = torch.from_numpy(written["token_embd.weight"])
    assert torch.equal(second.model.model.embed_tokens.weight, emb)
    for a, b in zip(
        first.model.state_dict().values(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)

    written = write_tiny_gguf(path, seed=1)  # the same path, other weights
    third = load_model(path, dtype="float32")
    assert conversions == ["tiny.gguf", "tiny.gguf"] and third.weights_hash != first.weights_hash
    assert torch.equal(
        third.model.model.embed_tokens.weight, torch.from_numpy(written["token_embd.weight"])
    )
