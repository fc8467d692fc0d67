"""Chat templating, end-of-turn ids and the text resources shipped in steerdiff/data/.

One place for how a conversation becomes text and token ids, used by the teachers
(generation), the fit (teacher-forced losses), extraction, the evaluations and the
monitor.

Tokenizers without a chat template (base models such as the embedded Gemma 3 270M) get
ONE fallback everywhere, plain text (`render_chat`):

    <system prompt>
    User: <user message>
    Assistant: <assistant message>
    Assistant:

(one line per message; the last line is the generation prompt), the tokenizer's eos as
the end of an assistant turn, and answers that start after a space (`answer_lead`). Provenance records which one a model used
(`LoadedModel.provenance()["chat_template"]`: "model" or "fallback:User/Assistant").

Whole texts become ids with `encode`: with the special tokens the tokenizer adds by
default (Gemma's <bos>; SmolLM2 and Qwen add none), without doubling a <bos> that a chat
template already wrote into the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

from .models import CHAT_FALLBACK, chat_template_source

FALLBACK_PREFIX = {"system": "", "user": "User: ", "assistant": "Assistant: "}
FALLBACK_GENERATION_PROMPT = "Assistant:"

__all__ = [
    "CHAT_FALLBACK",
    "answer_lead",
    "chat_prompt_ids",
    "chat_template_source",
    "chat_texts",
    "encode",
    "end_of_turn_ids",
    "read_lines_resource",
    "render_chat",
]


def read_lines_resource(name: str) -> list[str]:
    """Non-empty, non-comment lines of a text file in steerdiff/data/."""
    text = resources.files("steerdiff").joinpath("data", name).read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def render_chat(
    tokenizer: Any,
    messages: Sequence[dict],
    add_generation_prompt: bool = True,
    template_kwargs: dict | None = None,
) -> str:
    """A conversation as text: the tokenizer's chat template, else the plain fallback."""
    if chat_template_source(tokenizer) == "model":
        return tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **(template_kwargs or {}),
        )
    text = "".join(FALLBACK_PREFIX[m["role"]] + str(m["content"]) + "\n" for m in messages)
    return text + (FALLBACK_GENERATION_PROMPT if add_generation_prompt else "")


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a whole text (a sequence start) with the tokenizer's default special
    tokens, e.g. Gemma's <bos>, as the model's own usage and steering-vectors tokenize.
    A <bos> the text already holds (chat templates write one) is not doubled."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
        ids = ids[1:]
    return ids


def chat_texts(tokenizer, questions: Sequence[str], system_prompt: str | None = None) -> list[str]:
    """Chat prompts (text) ending with the assistant turn's header, one per question.

    system_prompt=None means no system message of ours: the chat template's own
    default applies (SmolLM2 inserts "You are a helpful AI assistant named SmolLM...").
    That is what the model sees at evaluation time, so it is the honest baseline.
    Turn a text into ids with `encode`.
    """
    out = []
    for q in questions:
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        msgs.append({"role": "user", "content": q})
        out.append(render_chat(tokenizer, msgs))
    return out


def chat_prompt_ids(
    tokenizer: Any, messages: list[dict], template_kwargs: dict | None = None
) -> list[int]:
    """Token ids of a chat ending with the assistant header (`encode(render_chat(...))`)."""
    return encode(tokenizer, render_chat(tokenizer, messages, True, template_kwargs))


def answer_lead(tokenizer: Any) -> str:
    """What comes between the generation prompt and an answer's first word: nothing after
    a chat template's assistant header (it ends the line), a space after the fallback's
    "Assistant:" (as a base model writes it: " Owl", not "Owl")."""
    return "" if chat_template_source(tokenizer) == "model" else " "


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token id(s) that end an assistant turn in this tokenizer's chat template; the eos
    token for the fallback (a base model has no end-of-turn token of its own)."""
    if chat_template_source(tokenizer) != "model":
        return [tokenizer.eos_token_id]
    user = [{"role": "user", "content": "x"}]
    prompt = render_chat(tokenizer, user)
    full = render_chat(tokenizer, user + [{"role": "assistant", "content": "MARK"}], False)
    tail = full[len(prompt) :].split("MARK", 1)[-1] if full.startswith(prompt) else ""
    ids = tokenizer(tail.rstrip("\n"), add_special_tokens=False).input_ids if tail else []
    return ids[:1] if ids else [tokenizer.eos_token_id]
