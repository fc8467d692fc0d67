"""Model loading: embedded default, GGUF checks, helpful errors."""

from __future__ import annotations

import pytest
import torch

from steerdiff.hooks import family_of
from steerdiff.models import ModelLoadError, load_model, resolve_spec


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
    assert len(smollm.weights_hash) == 16
    assert smollm.tokenizer.chat_template and "<|im_start|>" in smollm.tokenizer.chat_template
    prov = smollm.provenance()
    assert prov["model_id"] == "default" and prov["weights_hash"] == smollm.weights_hash
    # it is a real language model: a common continuation gets high probability
    ids = smollm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    top = smollm.model(input_ids=ids).logits[0, -1].argmax()
    assert "Paris" in smollm.tokenizer.decode(top)


@pytest.mark.slow
def test_bfloat16_load():
    lm = load_model("default", dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    ids = lm.tokenizer("Hello", return_tensors="pt").input_ids
    assert torch.isfinite(lm.model(input_ids=ids).logits.float()).all()


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
