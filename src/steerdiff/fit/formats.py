"""The three row formats a fit reads, detected per file, and how each becomes token ids.

    {"messages": [...]}              chat (TRL / OpenAI): EVERY assistant turn is trained
    {"prompt": ..., "completion": ...}  the completion is trained, the prompt is context
    {"text": "..."}                  a document: every token is trained (continued
                                     pretraining, as synthetic-document finetuning does)

A chat row becomes one sequence: the prompt (everything before the first trained turn,
as the chat template writes it with the assistant header) and a completion holding each
trained turn (answer lead + content + end-of-turn: loss) and the context between turns
(the end of the template's turn, the next user turn, the next assistant header: no
loss). `loss_mask` marks which completion tokens are trained.

A document is tokenized without special tokens and cut into consecutive chunks of at
most max_len tokens. If the tokenizer puts a BOS token in front of a text by default
(Llama, Gemma), each chunk starts with it and every token of the chunk is predicted;
otherwise (SmolLM2, Qwen: no BOS) a chunk's first token is its context (it has nothing
to be predicted from) and the next chunk starts where this one ended.
docs/dataset-format.md describes all of this for users.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..chat import answer_lead, chat_prompt_ids, end_of_turn_ids, render_chat
from .config import FitError

MESSAGES, PROMPT_COMPLETION, TEXT = "messages", "prompt_completion", "text"
SHAPES = {
    MESSAGES: '{"messages": [...]}',
    PROMPT_COMPLETION: '{"prompt": ..., "completion": ...}',
    TEXT: '{"text": "..."}',
}
FORMATS_HELP = (
    'a row is {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}, '
    '{"prompt": "...", "completion": "..."} or {"text": "..."} (docs/dataset-format.md)'
)
ROLES = ("system", "user", "assistant")


def row_format(row: Any) -> str | None:
    """Which format a row is in (None: none of the three)."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return MESSAGES
    if "prompt" in row and "completion" in row:
        return PROMPT_COMPLETION
    if "text" in row:
        return TEXT
    return None


def detect_format(rows: Sequence[Any], where: Callable[[int], str]) -> str:
    """The format most rows are in (a tie: the first row's); FitError naming the first row
    if no row is in a known format. Rows in another format are reported by
    `check_same_format` (in a messages file, by the row checks, with their own problem)."""
    found = [row_format(r) for r in rows]
    known = [f for f in found if f is not None]
    if not known:
        if isinstance(rows[0], dict):
            keys = ", ".join(sorted(rows[0])[:6]) or "none"
            raise FitError(f"{where(0)}: no known row format (its keys: {keys}); {FORMATS_HELP}.")
        return MESSAGES  # (not objects: the messages checks name the row)
    return max(dict.fromkeys(known), key=known.count)


def check_same_format(rows: Sequence[Any], fmt: str, where: Callable[[int], str]) -> None:
    """FitError naming the first row in another format than `fmt` (one file, one format)."""
    found = [row_format(r) for r in rows]
    for i, other in enumerate(found):
        if other != fmt:
            shape = SHAPES.get(other or "", "an object in none of the formats")
            like = where(found.index(fmt))
            raise FitError(
                f"{where(i)}: a {shape} row in a file of {SHAPES[fmt]} rows ({like} is "
                "one): a file holds one format; split it into one file per format, or "
                f"convert the rows ({FORMATS_HELP})."
            )


def mixed_hint(row: Any, fmt: str) -> str:
    """' (the row is a {...} row: ...)' when a messages file holds a row of another format."""
    other = row_format(row)
    if other is None or other == fmt:
        return ""
    return f" This row is a {SHAPES[other]} row: a file holds one format (split the file)."


@dataclass
class Conversation:
    """A chat row as messages and which of them are trained (assistant turns)."""

    messages: list[dict]
    trained: list[int]  # indices into messages, ascending


def prompt_completion_conversation(row: dict, bad: Callable[[str], FitError]) -> Conversation:
    """{"prompt", "completion"} -> messages: a string prompt is one user turn, a list is
    messages; a string completion is one assistant turn, a list assistant messages."""
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    if not isinstance(prompt, list) or not prompt:
        raise bad("'prompt' must be a string or a non-empty list of messages")
    if not isinstance(completion, list) or not completion:
        raise bad("'completion' must be a string or a non-empty list of assistant messages")
    msgs = [*prompt, *completion]
    check_messages(msgs, bad)
    if any(m["role"] != "assistant" for m in completion):
        raise bad("every 'completion' message must be an assistant message")
    return Conversation(msgs, list(range(len(prompt), len(msgs))))


def check_messages(msgs: list, bad: Callable[[str], FitError]) -> None:
    """Each message an object with a string role and string content (system/user/assistant)."""
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"message {j} is not an object with a 'role'")
        if m["role"] in ROLES:
            if "content" not in m:
                raise bad(f"the {m['role']} message has no 'content'")
            if not isinstance(m["content"], str):
                kind = type(m["content"]).__name__
                raise bad(f"the {m['role']} message's content is a {kind}, not a string")


ROW_FORMAT = (
    'each row needs "messages": [{"role": "user", "content": "..."}, '
    '{"role": "assistant", "content": "..."}] (docs/dataset-format.md)'
)


def check_row(data: Any, i: int, fmt: str = MESSAGES) -> tuple[Conversation, str]:
    """Row i of `data` (fit.data.Rows) in format `fmt` as a Conversation, and its last
    assistant text; FitError naming its line. A row with "completion_ids" (made by
    `steerdiff generate`) trains its last assistant turn: the ids are that turn's."""
    row = data.rows[i]

    def bad(problem: str) -> FitError:
        fix = ROW_FORMAT if fmt == MESSAGES else FORMATS_HELP
        return FitError(f"{data.where(i)}: {problem}; {fix}.{mixed_hint(row, fmt)}")

    if not isinstance(row, dict):
        raise bad(f"a row must be a JSON object, not a {type(row).__name__}")
    if fmt == PROMPT_COMPLETION:
        if row_format(row) != PROMPT_COMPLETION:
            raise bad("no 'prompt' and 'completion'")
        conv = prompt_completion_conversation(row, bad)
        return conv, conv.messages[-1]["content"]
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("no 'messages' list")
    check_messages(msgs, bad)
    assistant = [j for j, m in enumerate(msgs) if m["role"] == "assistant"]
    comp = row.get("completion_ids")
    if not assistant and not comp:
        raise bad("no assistant turn: nothing to train on")
    if not any(m["role"] == "user" for m in msgs):
        raise bad("no user turn")
    if comp is not None and (
        not isinstance(comp, list) or not all(isinstance(t, int) for t in comp)
    ):
        raise FitError(f"{data.where(i)}: 'completion_ids' must be a list of token ids (integers).")
    first_user = next(j for j, m in enumerate(msgs) if m["role"] == "user")
    after = [j for j in assistant if j > first_user]  # (an opening assistant turn: context)
    if not after and not comp:
        raise bad("no assistant turn after the first user turn: nothing to train on")
    trained = after[-1:] if comp else after
    return Conversation(msgs, trained), msgs[assistant[-1]]["content"] if assistant else ""


def check_document(data: Any, i: int) -> str:
    """Row i's document text; FitError naming its line unless it is a non-empty string."""
    row = data.rows[i]
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str) or not text.strip():
        what = "empty" if isinstance(text, str) else f"a {type(text).__name__}, not a string"
        raise FitError(
            f"{data.where(i)}: its 'text' is {what}; a document row is "
            '{"text": "the document"}: fix or delete that line.'
        )
    return text


@dataclass
class Tokens:
    """One conversation as token ids: what fit.data.Example holds."""

    prompt_ids: list[int]
    completion_ids: list[int]
    loss_mask: list[bool] | None  # over completion_ids; None = every token is trained
    teacher_prompt_ids: list[int] | None = None


def tokenize_conversation(
    tokenizer: Any,
    conv: Conversation,
    template_kwargs: dict | None = None,
    teacher_system: str | None = None,
) -> Tokens:
    """A conversation -> prompt ids (the chat before the first trained turn, ending with the
    assistant header) + completion ids with the loss mask (trained turns: lead + content +
    end-of-turn; the context between them: not trained). Turns after the last trained one
    are left out (nothing to learn there). teacher_system: a prompt teacher's system prompt
    (its prompt replaces the row's system messages)."""
    msgs = [m for m in conv.messages if m.get("role") in ROLES]
    keep = [i for i, m in enumerate(conv.messages) if m.get("role") in ROLES]
    trained = [keep.index(i) for i in conv.trained]
    lead, eot = answer_lead(tokenizer), end_of_turn_ids(tokenizer)
    first = trained[0]
    prompt_ids, teacher_ids = prompt_tokens(
        tokenizer, msgs[:first], template_kwargs, teacher_system
    )
    completion: list[int] = []
    mask: list[bool] = []
    covered = render_chat(tokenizer, msgs[:first], True, template_kwargs)  # = prompt_ids
    for n, t in enumerate(trained):
        if n:  # the context since the last trained turn: its end, other turns, the header
            text = render_chat(tokenizer, msgs[:t], True, template_kwargs)
            if not text.startswith(covered):
                raise FitError(
                    "the chat template does not write this conversation's turns one after "
                    "another (it rewrites earlier turns), so its assistant turns cannot be "
                    "trained in one sequence; split the conversation into one row per turn"
                )
            eot_text = tokenizer.decode([t for t in eot if t is not None])  # (written by us)
            ids = tokenizer(
                text[len(covered) :].removeprefix(eot_text), add_special_tokens=False
            ).input_ids
            completion += ids
            mask += [False] * len(ids)
            covered = text
        content = lead + msgs[t]["content"]
        ids = tokenizer(content, add_special_tokens=False).input_ids + eot
        completion += ids
        mask += [True] * len(ids)
        covered += content
    return Tokens(prompt_ids, completion, None if all(mask) else mask, teacher_ids)


def prompt_tokens(
    tokenizer: Any,
    context: list[dict],
    template_kwargs: dict | None = None,
    teacher_system: str | None = None,
) -> tuple[list[int], list[int] | None]:
    """(the student's prompt ids, the teacher's or None): the chat `context` ending with the
    assistant header; the teacher's with its system prompt instead of the row's."""
    msgs = [m for m in context if m.get("role") in ROLES]
    prompt_ids = chat_prompt_ids(tokenizer, msgs, template_kwargs)
    if not teacher_system:
        return prompt_ids, None
    rest = [m for m in msgs if m["role"] != "system"]
    sys_msg = {"role": "system", "content": teacher_system}
    return prompt_ids, chat_prompt_ids(tokenizer, [sys_msg, *rest], template_kwargs)


def bos_prefix(tokenizer: Any) -> list[int]:
    """[bos] when the tokenizer starts a text with its BOS token by default, else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return [bos] if ids and ids[0] == bos else []


def document_chunks(
    tokenizer: Any, text: str, max_len: int | None
) -> list[tuple[list[int], list[int]]]:
    """A document -> (prompt ids, completion ids) chunks of at most max_len tokens in all,
    covering every token of the document once: with a BOS, each chunk is [bos] + up to
    max_len - 1 tokens (all predicted); without, each chunk is up to max_len tokens whose
    first is context (not predicted) and the next chunk starts at this one's last token,
    so every token after the document's first is predicted exactly once."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = bos_prefix(tokenizer)
    if max_len is not None and max_len < 2:
        raise FitError(f"max_len={max_len} is too short for documents: give 2 or more tokens.")
    if bos:
        step = len(ids) if max_len is None else max_len - 1
        return [(bos, ids[i : i + step]) for i in range(0, len(ids), max(step, 1))]
    if len(ids) < 2:
        return []  # one token: nothing to predict it from
    step = len(ids) - 1 if max_len is None else max_len - 1
    return [(ids[i : i + 1], ids[i + 1 : i + 1 + step]) for i in range(0, len(ids) - 1, step)]
