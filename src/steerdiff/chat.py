"""Chat templating, end-of-turn ids and the text resources shipped in steerdiff/data/.

One place for how a conversation becomes token ids, used by the teachers (generation),
the fit (teacher-forced losses), extraction and the evaluations.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any


def read_lines_resource(name: str) -> list[str]:
    """Non-empty, non-comment lines of a text file in steerdiff/data/."""
    text = resources.files("steerdiff").joinpath("data", name).read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def chat_texts(tokenizer, questions: Sequence[str], system_prompt: str | None = None) -> list[str]:
    """Chat-templated prompts ending with the assistant turn's header.

    system_prompt=None means no system message of ours: the chat template's own
    default applies (SmolLM2 inserts "You are a helpful AI assistant named SmolLM...").
    That is what the model sees at evaluation time, so it is the honest baseline.
    """
    out = []
    for q in questions:
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        msgs.append({"role": "user", "content": q})
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


def chat_prompt_ids(
    tokenizer: Any, messages: list[dict], template_kwargs: dict | None = None
) -> list[int]:
    """Apply the chat template with the assistant header; plain 'User:/Assistant:' text for
    tokenizers without a template (base models)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            **(template_kwargs or {}),
        )
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    text = ""
    for m in messages:
        text += {"system": "", "user": "User: ", "assistant": "Assistant: "}[m["role"]]
        text += m["content"] + "\n"
    return tokenizer.encode(text + "Assistant:", add_special_tokens=True)


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token id(s) that end an assistant turn in this tokenizer's chat template."""
    user = [{"role": "user", "content": "x"}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        user + [{"role": "assistant", "content": "MARK"}], tokenize=False
    )
    tail = full[len(prompt) :].split("MARK", 1)[-1] if full.startswith(prompt) else ""
    ids = tokenizer(tail.rstrip("\n"), add_special_tokens=False).input_ids if tail else []
    return ids[:1] if ids else [tokenizer.eos_token_id]
