"""A tiny random llama that uses the embedded SmolLM2 tokenizer (chat template included)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from steerdiff.models import LoadedModel, wrap_model


def make_tiny_chat(tokenizer, seed: int = 0) -> LoadedModel:
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    model.requires_grad_(False)
    lm = wrap_model(model, tokenizer, spec="tiny-chat-llama")
    return lm
