"""Perception vs behaviour, per layer: does steering at layer l change how the model reads a
text, or what it writes?

One contrast vector per layer: the mean resid_post of positive minus negative sentences
(`SENTIMENT_POSITIVE` / `SENTIMENT_NEGATIVE`, mean over tokens after the first). Two
teacher-forced probes, both exact log-probs of one forward pass (no sampling), both steered
through `hooks.steer` with a bool position mask:

- perception: the user asks "Is the sentiment of this review positive or negative?" about a
  neutral review (`NEUTRAL_REVIEWS`); ONLY the review's tokens are steered; the question and
  the answer position are not. Read: log P("positive") - log P("negative") at the answer's
  first token (each word's case and leading-space variants pooled).
- behaviour: the user asks a neutral question and the assistant's reply so far ends right
  before an evaluative word (`BEHAVIOUR_ITEMS`, e.g. "My day was"); ONLY the reply's tokens
  (what the model writes, positions "response" under generation) are steered. Read:
  log-sum P(positive words) - log-sum P(negative words) for the next token.

Effect per item = (log-odds at +coeff - log-odds at -coeff) / 2, in nats, with a 95% CI over
the items (intervals.mean_ci95). Both read the same vector at the same coefficient, in the
same unit, so per layer one can say which one moves more: `dominant` compares them (the
difference's CI combines the two independent CIs in quadrature).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .chat import encode, render_chat
from .hooks import n_layers, steer
from .intervals import mean_ci95
from .models import LoadedModel
from .progress import progress as progress_bar
from .replay import full_hidden, hook_activations, lm_head

HOOK = "blocks.{layer}.hook_resid_post"

SENTIMENT_POSITIVE = [
    "I absolutely loved it, what a wonderful and happy day.",
    "This is fantastic, I am delighted with the excellent result.",
    "What a beautiful, joyful experience; everything went perfectly.",
    "The staff were kind and the food was delicious. Highly recommended!",
    "I feel great, grateful and full of hope today.",
    "Brilliant work, I am thrilled and proud of it.",
    "A lovely, charming film that made me smile the whole time.",
    "Everything about this is amazing and I am so happy.",
]
SENTIMENT_NEGATIVE = [
    "I absolutely hated it, what an awful and miserable day.",
    "This is terrible, I am disappointed with the dreadful result.",
    "What an ugly, painful experience; everything went wrong.",
    "The staff were rude and the food was disgusting. Avoid it!",
    "I feel awful, bitter and hopeless today.",
    "Horrible work, I am furious and ashamed of it.",
    "A dull, annoying film that made me cringe the whole time.",
    "Everything about this is dreadful and I am so sad.",
]
NEUTRAL_REVIEWS = [
    "The package arrived on Tuesday and contained the parts listed on the order.",
    "The hotel room had a bed, a desk and a window facing the street.",
    "The film is about two hours long and is set in a small town.",
    "The phone comes in black and grey and has a charger in the box.",
    "We ate at the restaurant at seven and paid by card.",
    "The book has twelve chapters and an index at the back.",
]
QUESTION = "Is the sentiment of this review positive or negative? Answer with one word.\n\nReview: "
BEHAVIOUR_ITEMS = [
    ("How was your day?", "My day was"),
    ("How was the movie you watched last night?", "Honestly, the movie was"),
    ("What do you think of the new restaurant in town?", "I think the food there is"),
    ("How was the weather on your trip?", "The weather was"),
    ("Describe your new job in a few words.", "My new job is"),
    ("How did the meeting go?", "The meeting was"),
]
POSITIVE_WORDS = ["positive"]
NEGATIVE_WORDS = ["negative"]
GOOD_WORDS = ["great", "good", "wonderful", "lovely", "amazing", "excellent", "fantastic"]
BAD_WORDS = ["terrible", "bad", "awful", "horrible", "boring", "disappointing", "sad"]


@dataclass
class ProbeItem:
    """One teacher-forced pass: token ids, the positions to steer, the read position's two
    answer sets (first-token ids)."""

    ids: list[int]
    mask: list[bool]
    yes: list[int]
    no: list[int]


@dataclass
class PerceptionResult:
    layers: list[int]
    n_layers: int
    coeff: float
    perception: list[dict]  # per layer {"mean", "ci95", "n", "base"} (nats of log-odds)
    behaviour: list[dict]
    dominant: list[str]  # per layer "perception" | "behaviour" | "neither"
    vector_norms: list[float]
    provenance: dict = field(default_factory=dict)

    @property
    def depth(self) -> list[float]:
        return [la / max(self.n_layers - 1, 1) for la in self.layers]

    def to_dict(self) -> dict:
        return {
            "provenance": self.provenance,
            "layers": self.layers,
            "relative_depth": self.depth,
            "n_layers": self.n_layers,
            "coeff": self.coeff,
            "perception": self.perception,
            "behaviour": self.behaviour,
            "dominant": self.dominant,
            "vector_norms": self.vector_norms,
        }


def first_tokens(tokenizer, words: Sequence[str]) -> list[int]:
    """Distinct first token ids of each word, lower/capitalised, with and without a space."""
    out: list[int] = []
    for w in words:
        for form in (w, w.capitalize(), " " + w, " " + w.capitalize()):
            ids = tokenizer(form, add_special_tokens=False)["input_ids"]
            if ids and ids[0] not in out:
                out.append(ids[0])
    return out


def perception_items(lm: LoadedModel, reviews: Sequence[str] = NEUTRAL_REVIEWS) -> list[ProbeItem]:
    """The classification prompts; the mask covers exactly the review's tokens."""
    tok = lm.tokenizer
    mark = "\x00REVIEW\x00"
    before, after = render_chat(tok, [{"role": "user", "content": QUESTION + mark}]).split(mark)
    yes, no = first_tokens(tok, POSITIVE_WORDS), first_tokens(tok, NEGATIVE_WORDS)
    items = []
    for text in reviews:
        head = encode(tok, before)
        body = tok(text, add_special_tokens=False)["input_ids"]
        tail = tok(after, add_special_tokens=False)["input_ids"]
        mask = [False] * len(head) + [True] * len(body) + [False] * len(tail)
        items.append(ProbeItem(head + body + tail, mask, yes, no))
    return items


def behaviour_items(
    lm: LoadedModel, items: Sequence[tuple[str, str]] = BEHAVIOUR_ITEMS
) -> list[ProbeItem]:
    """Neutral questions with the reply begun; the mask covers exactly the reply's tokens."""
    tok = lm.tokenizer
    yes, no = first_tokens(tok, GOOD_WORDS), first_tokens(tok, BAD_WORDS)
    out = []
    for question, reply in items:
        head = encode(tok, render_chat(tok, [{"role": "user", "content": question}]))
        body = tok(reply, add_special_tokens=False)["input_ids"]
        out.append(ProbeItem(head + body, [False] * len(head) + [True] * len(body), yes, no))
    return out


def log_odds(
    lm: LoadedModel,
    items: Sequence[ProbeItem],
    vector: torch.Tensor | None,
    hook: str,
    coeff: float,
) -> list[float]:
    """Per item: log-sum P(yes) - log-sum P(no) at its last position, steering only its
    mask. One batched pass, right-padded (a causal model's earlier positions never see the
    padding after them; the padding is not steered)."""
    width = max(len(it.ids) for it in items)
    pad = lm.tokenizer.pad_token_id or 0
    ids = torch.tensor([it.ids + [pad] * (width - len(it.ids)) for it in items], device=lm.device)
    mask = torch.tensor([it.mask + [False] * (width - len(it.mask)) for it in items])
    last = torch.tensor([len(it.ids) - 1 for it in items], device=lm.device)
    with torch.inference_mode():
        if vector is None or coeff == 0.0:
            h = full_hidden(lm.model, ids, None)
        else:
            with steer(lm.model, {hook: vector}, coeff, positions=mask.to(lm.device)):
                h = full_hidden(lm.model, ids, None)
        lp = torch.log_softmax(lm_head(lm.model, h[torch.arange(len(items)), last]).float(), -1)
    return [
        float(torch.logsumexp(lp[i, it.yes], 0) - torch.logsumexp(lp[i, it.no], 0))
        for i, it in enumerate(items)
    ]


def sentiment_vectors(lm: LoadedModel, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per layer: mean resid_post over the positive sentences' tokens minus the negative's
    (the first token of each text left out)."""
    hooks = [HOOK.format(layer=la) for la in layers]

    def mean_acts(texts: Sequence[str]) -> dict[str, torch.Tensor]:
        acts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
        for t in texts:
            ids = torch.tensor([encode(lm.tokenizer, t)], device=lm.device)
            for h, a in hook_activations(lm, hooks, ids).items():
                acts[h].append(a)
        return {h: torch.cat(a).mean(0) for h, a in acts.items()}

    pos, neg = mean_acts(SENTIMENT_POSITIVE), mean_acts(SENTIMENT_NEGATIVE)
    return {la: pos[h] - neg[h] for la, h in zip(layers, hooks, strict=True)}


def effect(
    lm: LoadedModel, items: Sequence[ProbeItem], v: torch.Tensor, hook: str, coeff: float, base
) -> dict:
    """(log-odds at +coeff - at -coeff) / 2 per item: {"mean", "ci95", "n", "base",
    "per_item"}; base: the unsteered log-odds per item."""
    up, down = log_odds(lm, items, v, hook, coeff), log_odds(lm, items, v, hook, -coeff)
    per = [(a - b) / 2 for a, b in zip(up, down, strict=True)]
    mean, ci = mean_ci95(per)
    return {
        "mean": mean,
        "ci95": list(ci),
        "n": len(per),
        "base": sum(base) / len(base),
        "per_item": per,
    }


def dominant(p: dict, b: dict) -> str:
    """Which effect is larger in size, where the difference's 95% CI (the two CIs' half
    widths in quadrature) excludes zero; "neither" otherwise."""
    hp = (p["ci95"][1] - p["ci95"][0]) / 2
    hb = (b["ci95"][1] - b["ci95"][0]) / 2
    diff = abs(p["mean"]) - abs(b["mean"])
    if abs(diff) <= math.hypot(hp, hb):
        return "neither"
    return "perception" if diff > 0 else "behaviour"


def perception_probe(
    lm: LoadedModel, layers: Sequence[int], coeff: float = 1.0, progress: bool = True
) -> PerceptionResult:
    """Perception and behaviour effects of the sentiment vector at each layer."""
    from .io import provenance

    vecs = sentiment_vectors(lm, layers)
    p_items, b_items = perception_items(lm), behaviour_items(lm)
    p_base = log_odds(lm, p_items, None, "", 0.0)
    b_base = log_odds(lm, b_items, None, "", 0.0)
    perc, beh, dom = [], [], []
    bar = progress_bar(len(layers), "perception vs behaviour", disable=not progress)
    for la in layers:
        hook = HOOK.format(layer=la)
        perc.append(effect(lm, p_items, vecs[la], hook, coeff, p_base))
        beh.append(effect(lm, b_items, vecs[la], hook, coeff, b_base))
        dom.append(dominant(perc[-1], beh[-1]))
        bar.update(1)
    bar.close()
    return PerceptionResult(
        layers=list(layers),
        n_layers=n_layers(lm.model),
        coeff=coeff,
        perception=perc,
        behaviour=beh,
        dominant=dom,
        vector_norms=[float(vecs[la].norm()) for la in layers],
        provenance=provenance(lm, config={"layers": list(layers), "coeff": coeff}),
    )
