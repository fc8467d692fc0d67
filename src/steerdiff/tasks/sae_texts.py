"""The default text an SAE is trained on: the offline corpus, chat prompts and number-task
chats, so the SAE sees the kinds of activation steerdiff reads (documents, the chat template,
the subliminal-learning numbers task).

    texts = sae_texts(lm.tokenizer, seed=0)        # list[str], seeded
    saes = train_saes(lm, cfg, out, texts=texts)

- corpus: `interpret.corpus.load_corpus(corpus, n=n_corpus, seed=seed)` (1,200 documents in
  five genres by default);
- chat: every prompt of steerdiff/data/*.txt (neutral, contrast and preference questions, the last about
  animals) as
  a user turn rendered with the model's chat template (`chat.render_chat`) up to the
  assistant's header;
- numbers: `tasks.numbers.make_prompts` user turns with a random answer of 3-10 numbers
  (0-999, comma-separated) as the assistant turn, the format the numbers task generates.
"""

from __future__ import annotations

import random
from typing import Any

from ..chat import read_lines_resource, render_chat
from ..interpret.corpus import load_corpus
from .numbers import NumbersConfig, make_prompts

CHAT_FILES = ("neutral_prompts.txt", "contrast_questions.txt", "preference_questions.txt")


def chat_prompt_texts(tokenizer: Any, n: int | None = None, seed: int = 0) -> list[str]:
    """The packaged prompts as chat text (user turn + the assistant's header)."""
    prompts = [
        p.replace("{category}", "animal") for name in CHAT_FILES for p in read_lines_resource(name)
    ]
    if n is not None:
        rng = random.Random(f"sae-chat:{seed}")
        prompts = (
            [rng.choice(prompts) for _ in range(n)] if n > len(prompts) else rng.sample(prompts, n)
        )
    return [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in prompts]


def number_texts(tokenizer: Any, n: int, seed: int = 0) -> list[str]:
    """n number-task chats: a make_prompts user turn and a random number-list answer."""
    rng = random.Random(f"sae-numbers:{seed}")
    out = []
    for prompt in make_prompts(n, NumbersConfig(seed=seed)):
        answer = ", ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(3, 10)))
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        out.append(render_chat(tokenizer, msgs, add_generation_prompt=False))
    return out


def sae_texts(
    tokenizer: Any,
    corpus: str = "default",
    n_corpus: int | None = None,
    n_chat: int | None = None,
    n_numbers: int = 1000,
    seed: int = 0,
) -> list[str]:
    """The training text mix (corpus + chat + numbers), seeded; the order does not matter
    (train_saes shuffles)."""
    texts = list(load_corpus(corpus, n=n_corpus, seed=seed).texts)
    texts += chat_prompt_texts(tokenizer, n_chat, seed)
    texts += number_texts(tokenizer, n_numbers, seed)
    return texts
