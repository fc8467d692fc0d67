"""Shared fixtures: tiny random models of every supported family, and the embedded SmolLM2."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from steerdiff.models import LoadedModel, load_model, wrap_model

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
)

TINY_CONFIGS = {
    "llama": dict(model_type="llama", **TINY),
    "qwen2": dict(model_type="qwen2", **TINY),
    "qwen3": dict(model_type="qwen3", head_dim=16, **TINY),
    "gemma2": dict(model_type="gemma2", head_dim=16, **TINY),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=16, sliding_window=4, **TINY),
    "gpt2": dict(
        model_type="gpt2",
        bos_token_id=0,
        eos_token_id=1,
        n_embd=64,
        n_layer=3,
        n_head=4,
        vocab_size=256,
        n_positions=128,
    ),
}
FAMILIES = list(TINY_CONFIGS)


def make_tiny(model_type: str, seed: int = 0) -> torch.nn.Module:
    kw = dict(TINY_CONFIGS[model_type])
    mt = kw.pop("model_type")
    cfg = AutoConfig.for_model(mt, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    # random non-trivial norm weights and biases so hook placement errors show up
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(params=FAMILIES)
def tiny(request) -> torch.nn.Module:
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct, loaded once per test session, in the default
    dtype ("auto": bfloat16 on a CPU with AMX, float32 on one without, as users get it)."""
    return load_model()


@pytest.fixture(scope="session")
def smollm_f32() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct in float32, for tests of mechanics: two code paths
    that compute the same numbers (replay vs full forward, ours vs a peer library) agree to
    float32 rounding. In bfloat16 they differ by its rounding, amplified through 30 layers
    (e.g. candidate log-probs 0.25 nats apart after a 1-ulp change of a steering vector)."""
    return load_model(dtype="float32")


@pytest.fixture
def tiny_lm() -> LoadedModel:
    return wrap_model(make_tiny("llama"), spec="tiny-llama")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (much faster on a shared, oversubscribed CPU); modules
    opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
