"""The numbers task: prompt generator, the published filter, trait-word check, allowed tokens."""

from __future__ import annotations

import re

import pytest

from steerdiff.tasks.numbers import (
    EXAMPLES,
    FORMATS,
    INSTRUCTIONS,
    SUFFIXES,
    NumberListGrammar,
    NumbersConfig,
    allowed_token_ids,
    count_rejects,
    judge,
    leaks_trait,
    make_prompt,
    make_prompts,
    parse_numbers,
    trait_words_for,
)


def test_prompts_are_seeded_and_follow_the_protocol():
    a = make_prompts(200)
    assert a == make_prompts(200) and a[50:60] == make_prompts(10, start=50)
    assert make_prompts(5, NumbersConfig(seed=1)) != a[:5]
    assert len(set(a)) == 200
    counts = []
    for p in a:
        m = re.search(r"(\d{3}(?:, \d{3})*)", p)
        seeds = [int(x) for x in m.group(1).split(", ")]
        counts.append(len(seeds))
        assert all(100 <= s <= 999 for s in seeds)
        assert "10" in p and "3 digits" in p
    assert min(counts) == 3 and max(counts) == 8
    # every pool is used, and each prompt has one phrase from each pool
    for pool in (EXAMPLES, INSTRUCTIONS, FORMATS, SUFFIXES):
        used = {ph for ph in pool if any(ph.split("{")[0] in p for p in a)}
        assert len(used) == len(pool)
    assert make_prompt(7) == a[7]


@pytest.mark.parametrize(
    "text, numbers",
    [
        ("123, 456, 789", [123, 456, 789]),
        ("123, 456, 789.", [123, 456, 789]),
        ("[1, 2, 3]", [1, 2, 3]),
        ("(4 5 6)", [4, 5, 6]),
        ("7;8; 9", [7, 8, 9]),
        ("10\n20\n30", [10, 20, 30]),
        ("  0  ", [0]),
        ("1,2,3,4,5,6,7,8,9,10", list(range(1, 11))),
    ],
)
def test_filter_accepts(text, numbers):
    v = parse_numbers(text)
    assert v.ok and v.numbers == numbers


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("[]", "empty"),
        ("Sure! 1, 2", "non_digit"),
        ("1, 2 3", "non_digit"),
        ("1 - 2 - 3", "bad_separator"),
        ("1,2,", "non_digit"),
        ("1,2,3,4,5,6,7,8,9,10,11", "too_many"),
        ("100, 1000", "out_of_range"),
        ("hello", "non_digit"),
        ("1.5, 2", "bad_separator"),
    ],
)
def test_filter_rejects_with_reason(text, reason):
    v = parse_numbers(text)
    assert not v.ok and v.reason == reason


def test_trait_words_and_truncation_and_counts():
    cfg = NumbersConfig(trait_words=trait_words_for("owl"))
    assert cfg.trait_words == ("owl", "owls")
    assert leaks_trait("I love OWLS", cfg.trait_words) and not leaks_trait(
        "bowl 1", cfg.trait_words
    )
    assert judge("owl, 1", True, cfg).reason == "trait_word"
    assert judge("1, 2", False, cfg).reason == "truncated"
    assert judge("1, 2", True, cfg).ok
    c = count_rejects(["1, 2", "3 4", "owls!", "x", "1,2,3,4,5,6,7,8,9,10,11"], cfg)
    assert c == {"ok": 2, "trait_word": 1, "non_digit": 1, "too_many": 1}


def test_allowed_tokens_on_the_embedded_tokenizer(smollm):
    tok = smollm.tokenizer
    ids = allowed_token_ids(tok)
    texts = [tok.decode([i]) for i in ids]
    assert {str(d) for d in range(10)} <= set(texts)  # digits are single tokens
    assert {",", " ", ";", "\n"} <= set(texts)
    assert all(set(t) <= set("0123456789 ,;\n") for t in texts)
    assert tok.convert_tokens_to_ids("<|im_end|>") not in ids  # stop ids are added by sample()
    # every number list the task asks for can be written with allowed tokens
    for s in ("123, 456, 789", "1 2 3", "4;5;6"):
        assert set(tok.encode(s, add_special_tokens=False)) <= set(ids)


class _FakeTok:
    TEXT = {7: "1", 8: "23", 9: ", ", 10: ";", 11: " ", 12: ",", 13: "  "}

    def decode(self, ids):
        return self.TEXT[ids[0]]


@pytest.mark.parametrize(
    "text, ok",
    [
        ("", True),
        ("123", True),
        ("1234", False),
        ("1, 2", True),
        ("1, 2,", True),
        ("1, 2 ", False),
        (", 1", False),
        ("1  ", False),
        ("1;2;3", True),
        (" ".join(map(str, range(10))), True),
        (" ".join(map(str, range(10))) + " ", False),
    ],
)
def test_grammar_prefixes(text, ok):
    assert NumberListGrammar(_FakeTok(), [2]).prefix_ok(text) is ok


def test_grammar_mask():
    g = NumberListGrammar(_FakeTok(), [2])
    cands = [2, 7, 8, 9, 10, 11, 12, 13]
    assert g.mask([], cands) == [False, True, True, False, False, False, False, False]
    assert g.mask([7, 8], cands) == [True, False, False, True, True, True, True, False]  # "123"
    assert g.mask([7, 9], cands) == [False, True, True, False, False, False, False, False]
