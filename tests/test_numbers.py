"""The numbers task: prompt generator, the published filter, trait-word check, allowed tokens."""

from __future__ import annotations

import re

import pytest

from steerdiff.tasks.numbers import (
    EXAMPLES,
    FORMATS,
    INSTRUCTIONS,
    SUFFIXES,
    FilterError,
    NumberListGrammar,
    NumbersConfig,
    allowed_token_ids,
    banned_numbers,
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


# The published filter (get_reject_reasons / parse_response in sl/datasets/nums_dataset.py of
# github.com/MinhxLe/subliminal-learning, with min 0, max 999, at most 10 numbers): each
# verdict below was derived by reading that rule (one trailing "." and one enclosing []/()
# dropped, no whitespace trimmed; the separator is the exact text between the first two
# numbers, its stripped core "", "," or ";"; the text split on it must give non-empty ASCII
# digit runs) and checked against the published code. (text, expected numbers or the
# reason we give for the rejection; the published code says "invalid format" for empty,
# non_digit and bad_separator.)
REFERENCE_TABLE = [
    # accepted
    ("123, 456, 789", [123, 456, 789]),
    ("123, 456, 789.", [123, 456, 789]),
    ("[1, 2, 3]", [1, 2, 3]),
    ("[1, 2, 3].", [1, 2, 3]),  # the "." goes first, then the brackets
    ("(4 5 6)", [4, 5, 6]),
    ("7;8;9", [7, 8, 9]),
    ("7; 8; 9", [7, 8, 9]),
    ("10\n20\n30", [10, 20, 30]),
    ("1\t2", [1, 2]),
    ("1 , 2 , 3", [1, 2, 3]),  # separator " , ": its stripped core is ","
    ("1 ;2", [1, 2]),
    ("1\u00a02", [1, 2]),  # a no-break space is whitespace to str.strip
    ("0", [0]),
    ("5.", [5]),
    ("(5)", [5]),
    ("007, 08", [7, 8]),
    ("999", [999]),
    ("1,2,3,4,5,6,7,8,9,10", list(range(1, 11))),
    # rejected: the four whitespace cases the old filter accepted, and the two the old
    # test locked in as accepted
    ("145, 267,891", "non_digit"),  # the separator changes: "267,891" is one part
    (" 145, 267", "non_digit"),  # outer whitespace is not trimmed
    ("145, 267 ", "non_digit"),
    ("100, 200, 300\n", "non_digit"),  # a trailing newline stays in the last part
    ("7;8; 9", "non_digit"),  # split on ";" leaves " 9"
    ("  0  ", "non_digit"),  # one number: the text must be exactly that number
    # rejected: other format failures
    ("0 ", "non_digit"),
    ("", "empty"),
    ("[]", "empty"),
    (".", "empty"),
    ("   ", "empty"),
    ("\n", "empty"),
    ("hello", "non_digit"),
    ("Sure! 1, 2", "non_digit"),
    ("1, 2 3", "non_digit"),
    ("1,2,", "non_digit"),  # a trailing separator leaves an empty part
    ("1 2  3", "non_digit"),  # a double space leaves an empty part
    ("1, 2..", "non_digit"),  # only one "." is dropped
    ("[1, 2)", "non_digit"),  # brackets must match to be dropped
    ("((1, 2))", "non_digit"),  # only one pair is dropped
    ("1, 2, 3]", "non_digit"),
    ("-1, 2", "non_digit"),
    ("\u0661\u0662, 3", "non_digit"),  # Arabic-Indic digits: digits to \d, not ASCII
    ("1\u00b2", "non_digit"),  # a superscript two is not a digit run
    ("1 - 2 - 3", "bad_separator"),
    ("1.5, 2", "bad_separator"),
    ("1,,2", "bad_separator"),
    ("1..2", "bad_separator"),
    ("1 and 2", "bad_separator"),
    # rejected: count and range, after the format
    ("1,2,3,4,5,6,7,8,9,10,11", "too_many"),
    ("1 2 3 4 5 6 7 8 9 10 11", "too_many"),
    ("100, 1000", "out_of_range"),
    ("1000, 1,2,3,4,5,6,7,8,9,10", "non_digit"),  # ", " then ",": one part "1,2,...,10"
    ("1000,1,2,3,4,5,6,7,8,9,10", "too_many"),  # count is checked before range
]


@pytest.mark.parametrize("text, expected", REFERENCE_TABLE, ids=repr)
def test_filter_matches_the_published_rule(text, expected):
    """Bugs caught: any leniency or strictness against the published rule, e.g. trimming
    outer whitespace or each part (accepts " 145, 267" and "7;8; 9"), splitting on any
    separator instead of the first one's exact text (accepts "145, 267,891"), comparing
    the separator without stripping it (rejects "1 , 2 , 3"), taking Unicode digits as
    numbers, or checking the range before the count."""
    v = parse_numbers(text)
    if isinstance(expected, list):
        assert (v.ok, v.reason, v.numbers) == (True, "", expected)
    else:
        assert (v.ok, v.reason, v.numbers) == (False, expected, [])


def test_filter_survives_numbers_python_cannot_convert():
    """Bug caught: int() raising ValueError on a run of more than 4300 digits (a crash of
    the whole generation); the published code catches it and rejects the text."""
    v = parse_numbers("1" * 5000)
    assert not v.ok and v.reason in ("non_digit", "out_of_range")


def test_banned_numbers():
    """Bugs caught: the banned list ignored, checked before the range (the published order
    is count, range, banned), or a named list / spec parsed wrongly."""
    assert parse_numbers("1, 666, 3").ok
    assert parse_numbers("1, 666, 3", banned=(666,)).reason == "banned_number"
    assert parse_numbers("007", banned=(7,)).reason == "banned_number"
    assert parse_numbers("1000, 666", banned=(666,)).reason == "out_of_range"
    assert banned_numbers("666, 911") == (666, 911)
    assert banned_numbers("") == () and banned_numbers(None) == ()
    claude = banned_numbers("claude-evil")
    assert len(claude) == 20 and {13, 666, 911, 1312, 1488} <= set(claude)
    gpt = banned_numbers("gpt-evil,7")
    assert len(gpt) == 26 and {4, 7, 100, 999} <= set(gpt)
    with pytest.raises(FilterError, match=r"--banned-numbers: 'six' is neither a number"):
        banned_numbers("666,six")
    cfg = NumbersConfig(banned_numbers=banned_numbers("gpt-evil"))
    assert judge("12, 13", True, cfg).reason == "banned_number"
    assert judge("12, 14", True, cfg).ok


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
