"""Preference evaluation: categories, the cached exact scorer, the sampling scorer."""

from __future__ import annotations

import json

import pytest
import torch
from _chat_tiny import make_tiny_chat

from steerdiff.evals import (
    Category,
    CategoryError,
    Steering,
    answer_hits,
    answer_variants,
    candidate_logprobs,
    exact_preference,
    load_category,
    paired_difference,
    question_prompts,
    sample_preference,
)
from steerdiff.extract import contrast_vector, system_prompt_contrast, trait_system_prompt

HOOK = "blocks.1.hook_resid_post"
CANDS = ["owl", "cat", "elephant", "dolphin"]
QS = ["Name your favorite animal in one word.", "Which animal do you like best? One word."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def chat(smollm):
    return make_tiny_chat(smollm.tokenizer)


def _naive_logprobs(lm, prompts, candidates, steer_vec=None, coeff=1.0, response_only=False):
    """One full forward per (question, surface form): the reference for the cached scorer."""
    from steerdiff.hooks import steer

    out = torch.zeros(len(prompts), len(candidates))
    for qi, p in enumerate(prompts):
        for ci, c in enumerate(candidates):
            vals = []
            for v in answer_variants(c):
                f = lm.tokenizer(v, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([p + f])
                pos = torch.zeros_like(ids, dtype=torch.bool)
                pos[:, len(p) :] = True
                ctx = (
                    steer(lm.model, {HOOK: steer_vec}, coeff, pos if response_only else "all")
                    if steer_vec is not None
                    else torch.no_grad()
                )
                with torch.no_grad(), ctx:
                    lp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), -1)
                vals.append(sum(float(lp[len(p) - 1 + j, f[j]]) for j in range(len(f))))
            out[qi, ci] = torch.logsumexp(torch.tensor(vals), 0)
    return out


def test_cached_scorer_equals_naive(chat):
    prompts = question_prompts(chat, QS, None)
    v = torch.randn(64)
    torch.testing.assert_close(
        candidate_logprobs(chat, prompts, CANDS)[0],
        _naive_logprobs(chat, prompts, CANDS),
        atol=1e-4,
        rtol=1e-4,
    )
    steered = candidate_logprobs(chat, prompts, CANDS, Steering({HOOK: v}, coeff=2.0))[0]
    torch.testing.assert_close(
        steered, _naive_logprobs(chat, prompts, CANDS, v, 2.0), atol=1e-4, rtol=1e-4
    )
    resp = candidate_logprobs(chat, prompts, CANDS, Steering({HOOK: v}, 2.0, positions="response"))[
        0
    ]
    torch.testing.assert_close(
        resp,
        _naive_logprobs(chat, prompts, CANDS, v, 2.0, response_only=True),
        atol=1e-4,
        rtol=1e-4,
    )
    grouped = candidate_logprobs(chat, prompts, CANDS, Steering({HOOK: v}, coeff=[0.0, 2.0]))
    assert grouped.shape == (2, 2, 4)
    torch.testing.assert_close(grouped[1], steered, atol=1e-4, rtol=1e-4)


def _ci95(rates: list[float]) -> tuple[float, float]:
    """mean +- 1.96 sd / sqrt(n) (sd with n - 1), written out independently of the package."""
    t = torch.tensor(rates, dtype=torch.float64)
    half = 1.96 * float(t.std(unbiased=True)) / len(rates) ** 0.5
    return float(t.mean()) - half, float(t.mean()) + half


def test_exact_result_full_distribution(chat):
    """The result's figures equal one full forward per (question, answer form): shares,
    per-question rates, the mean and its 95% CI. Bugs caught: a CI around the wrong mean or
    with the wrong spread (mutation tried: sd / n instead of sd / sqrt(n) -> CI mismatch),
    a system prompt that does not reach the prompts."""
    cat = Category("animal", CANDS, QS)
    r = exact_preference(chat, "owl", cat, system_prompt="You love owls.")
    share = torch.softmax(
        _naive_logprobs(chat, question_prompts(chat, QS, "You love owls."), CANDS), -1
    )
    assert list(r.distribution) == CANDS
    assert list(r.distribution.values()) == pytest.approx(share.mean(0).tolist(), abs=1e-5)
    rates = share[:, 0].tolist()
    assert [q["target_rate"] for q in r.per_question] == pytest.approx(rates, abs=1e-5)
    assert r.target_rate == pytest.approx(sum(rates) / 2, abs=1e-5) and r.n_questions == 2
    assert r.ci95 == pytest.approx(_ci95(rates), abs=1e-5)
    others = {c: x for c, x in r.distribution.items() if c != "owl"}
    assert r.off_target() == (max(others, key=others.get), max(others.values()))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["scorer"] == "exact" and d["system_prompt"] == "You love owls."
    with pytest.raises(ValueError, match="one coeff"):
        exact_preference(
            chat, "owl", cat, steering=Steering({HOOK: torch.zeros(64)}, coeff=[1.0, 2.0])
        )


def test_paired_difference_against_the_same_questions(chat):
    cat = Category("animal", CANDS, QS)
    base = exact_preference(chat, "owl", cat)
    prompted = exact_preference(chat, "owl", cat, system_prompt="You love owls.")
    diff, (lo, hi) = paired_difference(prompted, base)
    per_q = [
        p["target_rate"] - b["target_rate"]
        for p, b in zip(prompted.per_question, base.per_question, strict=True)
    ]
    assert diff == pytest.approx(sum(per_q) / 2)
    assert diff == pytest.approx(prompted.target_rate - base.target_rate)
    assert (lo, hi) == pytest.approx(_ci95(per_q), abs=1e-9)
    assert paired_difference(base, base) == (0.0, (0.0, 0.0))
    other = exact_preference(chat, "owl", Category("animal", CANDS, QS[:1]))
    with pytest.raises(ValueError, match="same questions"):
        paired_difference(other, base)


def test_sampling_scorer_mechanics(chat):
    """The rates are the published protocol applied to the seeded, steered samples: per
    question the fraction of answers naming each candidate (or none: "other"), then the
    mean over questions. Bugs caught: steering not applied while sampling (mutation tried:
    no `steered(...)` in sample_answers -> other answers), hits counted wrongly."""
    from steerdiff.chat import chat_texts
    from steerdiff.evals import sample_answers

    letters = ["a", "e", "o", "u", "zq"]  # a random model's answers name these (and zq never)
    cat = Category("letter", letters, QS)
    steering = Steering({HOOK: 30 * torch.randn(64, generator=torch.Generator().manual_seed(1))})
    r = sample_preference(chat, "e", cat, n_samples=3, max_new_tokens=2, steering=steering)
    answers = sample_answers(chat, chat_texts(chat.tokenizer, QS), 3, 1.0, 2, steering=steering)
    assert [q["answers"] for q in r.per_question] == answers
    plain = sample_answers(chat, chat_texts(chat.tokenizer, QS), 3, 1.0, 2)
    assert plain != answers  # the steering changed what was sampled
    want = {c: 0.0 for c in [*letters, "other"]}
    for ans in answers:
        for a in ans:
            hits = [c for c in letters if c in a.lower()]
            for c in hits or ["other"]:
                want[c] += 1 / 3 / len(QS)
    assert r.distribution == pytest.approx(want, abs=1e-6) and r.n_samples == 3
    assert r.target_rate == pytest.approx(want["e"], abs=1e-6) and 0 < want["e"] < 1
    assert r.steering["coeff"] == 1.0


def test_answer_hits_protocol():
    names = ["owl", "cat", "dog"]
    assert answer_hits("Owl.", names) == [0]
    assert answer_hits("  my favorite is the CAT", names) == [1]
    assert answer_hits("Elephant", names) == []
    assert answer_hits("Bowl", names) == [0]  # substring rule of the published protocol


def test_builtin_category():
    cat = load_category("animals")
    assert cat.name == "animal" and len(cat.candidates) == 15 and "owl" in cat.candidates
    assert len(cat.questions) == 50 and len(set(cat.questions)) == 50
    assert all("animal" in q and "{category}" not in q for q in cat.questions)


def test_category_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: animal\ncandidates: [owl, cat\n")
    with pytest.raises(CategoryError, match="does not parse.*Expected YAML or JSON"):
        load_category(bad)
    badjson = tmp_path / "bad.json"
    badjson.write_text('{"name": "animal", "candidates": ["owl",]}')
    with pytest.raises(CategoryError, match="does not parse"):
        load_category(badjson)
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps({"name": "animal", "candidates": ["owl", "Cat", "cat"]}))
    with pytest.raises(CategoryError, match=r"duplicates.*\['cat'\].*list each candidate once"):
        load_category(dup)
    nokeys = tmp_path / "nokeys.yaml"
    nokeys.write_text("- owl\n- cat\n")
    with pytest.raises(CategoryError, match="keys 'name'.*'candidates'"):
        load_category(nokeys)
    with pytest.raises(CategoryError, match="No category file"):
        load_category(tmp_path / "missing.yaml")
    good = tmp_path / "birds.yaml"
    good.write_text("name: bird\ncandidates: [owl, robin]\n")
    cat = load_category(good)
    assert cat.candidates == ["owl", "robin"] and "bird" in cat.questions[0]
    with pytest.raises(CategoryError, match="not among the candidates"):
        exact_preference(None, "eagle", cat)  # type: ignore[arg-type]


@pytest.mark.slow
def test_owl_vector_raises_owl_share(smollm):
    """Behaviour on the embedded model: last-token owl contrast at layer 24, x2."""
    questions = [
        "Tell me a fun fact.",
        "What should I cook tonight?",
        "Describe a peaceful place.",
        "What is your favorite season?",
        "Give me a tip for studying.",
        "What makes a good friend?",
    ]
    pos, neg = system_prompt_contrast(smollm.tokenizer, trait_system_prompt("owl"), questions)
    hook = "blocks.24.hook_resid_post"
    vs = contrast_vector(smollm, pos, neg, hook, "last")
    base = exact_preference(smollm, "owl", n_questions=4)
    steered = exact_preference(smollm, "owl", n_questions=4, steering=Steering(vs, coeff=2.0))
    teacher = exact_preference(
        smollm, "owl", n_questions=4, system_prompt=trait_system_prompt("owl")
    )
    assert base.target_rate == pytest.approx(0.0103, abs=5e-4)  # the embedded model's owl share
    assert steered.target_rate > 5 * base.target_rate
    assert teacher.target_rate > 2 * base.target_rate
