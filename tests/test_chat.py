"""Chat formatting for the second family: the embedded Gemma 3 270M has no chat template.

Every caller (chat texts and ids, end of turn, the exact scorer, extraction, teachers) goes
through one fallback in chat.py, recorded in provenance; whole texts keep the tokenizer's
<bos>, so extraction equals steering-vectors on plain text.
"""

from __future__ import annotations

import pytest
import torch

from steerdiff.chat import (
    CHAT_FALLBACK,
    chat_prompt_ids,
    chat_texts,
    encode,
    end_of_turn_ids,
    render_chat,
)
from steerdiff.evals import Category, exact_preference
from steerdiff.extract import contrast_vector, trait_system_prompt, trait_vectors
from steerdiff.models import load_model
from steerdiff.teachers import build_teacher

# slow: loads the embedded Gemma 3 270M (about 4 s once converted)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

CANDS = ["owl", "cat", "dog", "eagle"]
QS = ["Name your favorite animal in one word.", "Which animal do you like best? One word."]


@pytest.fixture(scope="module")
def gemma():
    # float32: these tests compare our code paths with hand computations through other
    # paths (one full forward per answer, hidden_states); in bfloat16 those differ by its
    # rounding (the exact scorer's owl share 0.118 vs 0.127 by hand on this model)
    return load_model("gemma3-270m", dtype="float32")


def test_gemma_chat_goes_through_the_one_fallback(gemma, smollm):
    """Bug caught: chat_texts / end_of_turn_ids called tokenizer.apply_chat_template on a
    tokenizer without a template (transformers' ValueError "chat_template is not set").
    Mutation tried: render_chat always calling apply_chat_template -> ValueError here."""
    tok = gemma.tokenizer
    assert not tok.chat_template and gemma.provenance()["chat_template"] == CHAT_FALLBACK
    assert smollm.provenance()["chat_template"] == "model"
    text = "You love owls.\nUser: Hi?\nAssistant:"
    assert chat_texts(tok, ["Hi?"], "You love owls.") == [text]
    assert chat_texts(tok, ["Hi?"]) == ["User: Hi?\nAssistant:"]
    msgs = [{"role": "system", "content": "You love owls."}, {"role": "user", "content": "Hi?"}]
    want = [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids
    assert chat_prompt_ids(tok, msgs) == want and want[0] == 2  # <bos> once
    teacher = build_teacher({"kind": "prompt", "system_prompt": "You love owls."}, gemma)
    assert teacher.prompt_ids("Hi?") == want
    assert end_of_turn_ids(tok) == [tok.eos_token_id] == [1]
    done = msgs + [{"role": "assistant", "content": "Owl"}]
    assert render_chat(tok, done, add_generation_prompt=False) == text[: -len("Assistant:")] + (
        "Assistant: Owl\n"
    )


def test_encode_adds_bos_once(gemma, smollm):
    """Bug caught: a <bos> doubled when a chat template already wrote one, or dropped
    (add_special_tokens=False) for plain text. SmolLM2's tokenizer adds none: unchanged."""
    tok = gemma.tokenizer
    plain = tok("The owl", add_special_tokens=False).input_ids
    assert encode(tok, "The owl") == [2, *plain]
    assert encode(tok, "<bos>The owl") == [2, *plain]  # already there: not doubled
    st = smollm.tokenizer
    text = chat_texts(st, ["Hi?"])[0]
    assert encode(st, text) == st(text, add_special_tokens=False).input_ids


def _naive_share(lm, questions, candidates, target) -> list[float]:
    """Per question: P(target) / sum P(candidate) with one full forward per answer form
    ("Owl", "owl", after the fallback's space), prompt = <bos> + fallback chat text."""
    tok = lm.tokenizer
    rates = []
    for q in questions:
        prompt = [tok.bos_token_id] + tok(
            f"User: {q}\nAssistant:", add_special_tokens=False
        ).input_ids
        mass = []
        for c in candidates:
            lps = []
            for form in (" " + c.capitalize(), " " + c):
                f = tok(form, add_special_tokens=False).input_ids
                with torch.no_grad():
                    ids = torch.tensor([prompt + f])
                    logits = lm.model(input_ids=ids, logits_to_keep=len(f) + 1).logits[0]
                lp = logits.float().log_softmax(-1)
                lps.append(sum(float(lp[j, t]) for j, t in enumerate(f)))
            mass.append(torch.logsumexp(torch.tensor(lps), 0))
        rates.append(float(torch.softmax(torch.stack(mass), 0)[candidates.index(target)]))
    return rates


def test_exact_preference_on_gemma(gemma):
    """Bug caught: the exact scorer crashing without a chat template, or scoring the answer
    without <bos> / without the space a base model writes after "Assistant:" ("Owl" is
    ~6 nats less likely than " Owl" there). Mutations tried: question_prompts without
    special tokens, answer_forms without the lead space -> per-question shares off by >0.01."""
    r = exact_preference(gemma, "owl", Category("animal", CANDS, QS))
    want = _naive_share(gemma, QS, CANDS, "owl")
    got = [q["target_rate"] for q in r.per_question]
    assert got == pytest.approx(want, abs=1e-4)
    assert r.target_rate == pytest.approx(sum(want) / 2, abs=1e-4)


def test_trait_vectors_on_gemma_equal_a_direct_read(gemma):
    """Bug caught: trait_vectors crashing without a chat template (chat_texts), or reading
    prompts without <bos>. The last-token vector at block 9 equals the mean difference of
    hidden_states[10] at the last token of <bos> + fallback text, with vs without the prompt."""
    questions = ["Tell me a fun fact.", "What should I cook tonight?"]
    hook = "blocks.9.hook_resid_post"
    got = trait_vectors(gemma, "owl", hooks=hook, questions=questions)["last"]
    system = trait_system_prompt("owl")

    def last(text: str) -> torch.Tensor:
        ids = gemma.tokenizer(text, return_tensors="pt").input_ids  # default: adds <bos>
        with torch.no_grad():
            out = gemma.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
            return out.hidden_states[10][0, -1]

    pos = torch.stack([last(f"{system}\nUser: {q}\nAssistant:") for q in questions]).mean(0)
    neg = torch.stack([last(f"User: {q}\nAssistant:") for q in questions]).mean(0)
    torch.testing.assert_close(got[hook], pos - neg, atol=2e-3, rtol=1e-4)


def test_plain_text_extraction_matches_steering_vectors_on_gemma(gemma):
    """Issue 12: extraction tokenized with add_special_tokens=False, so Gemma got no <bos>
    while steering-vectors (and the model's own usage) adds it: cosine 0.469 between the
    two libraries' vectors on plain text. Mutation tried: extract._tokenize without special
    tokens -> cosine 0.18 here, the test fails."""
    sv = pytest.importorskip("steering_vectors")
    pos = ["I adore owls; they are wise.", "Owls hoot at night."]
    neg = ["I like the weather today.", "The river flows to the sea."]
    layer = 6
    ours = contrast_vector(gemma, pos, neg, f"blocks.{layer}.hook_resid_post", "last")
    peer = sv.train_steering_vector(
        gemma.model,
        gemma.tokenizer,
        list(zip(pos, neg, strict=True)),
        layers=[layer],
        read_token_index=-1,
        batch_size=1,
        show_progress=False,
    )
    v, w = ours[f"blocks.{layer}.hook_resid_post"], peer.layer_activations[layer].float()
    cos = float(v @ w / (v.norm() * w.norm()))
    assert cos > 0.9999, cos
    torch.testing.assert_close(v, w, atol=2e-3 * float(w.abs().max()), rtol=1e-3)
