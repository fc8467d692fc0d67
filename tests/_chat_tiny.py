"""A tiny random llama that uses the embedded SmolLM2 tokenizer (chat template included)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from steerdiff.models import LoadedModel, wrap_model


def make_tiny_chat(
    tokenizer, seed: int = 0, model_type: str = "llama", layers: int = 3, spec: str | None = None
) -> LoadedModel:
    """A tiny random model of `model_type` (llama, gemma3_text, ...) with `layers` blocks."""
    extra = {"head_dim": 16, "sliding_window": 4} if model_type == "gemma3_text" else {}
    cfg = AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    return wrap_model(model, tokenizer, spec=spec or f"tiny-chat-{model_type}")


def direct_answer_logp(
    lm: LoadedModel, user: str, forms: list[str], context: list[dict] | None = None
) -> float:
    """log sum over `forms` of P(all the form's tokens | the chat prompt of `user`): one full
    forward per form, no cache. The independent reference the exact scorers' tests (beliefs,
    multiple-choice misalignment) compare with. context: chat turns before the user's."""
    tok = lm.tokenizer
    text = tok.apply_chat_template(
        [*(context or []), {"role": "user", "content": user}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompt = tok(text, add_special_tokens=False).input_ids
    total = []
    for form in forms:
        ids = tok(form, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = lm.model(torch.tensor([prompt + ids])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        total.append(sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(ids)))
    return float(torch.logsumexp(torch.tensor(total), 0))
