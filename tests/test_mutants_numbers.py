"""The numbers filter's own checks, where mutation testing (bench/mutation.py) found gaps.

Each test names the mutants of src/steerdiff/tasks/numbers_filter.py it kills; each was
re-run with `mutmut run <name>` and seen killed. docs/testing.md has the counts.
"""

from __future__ import annotations

import pytest

from steerdiff.tasks import numbers_filter as nf


def test_trait_word_and_truncated_verdicts_are_rejections():
    """Catches: a trait-word or truncated verdict with ok=True (or ok=None), which a caller
    testing `v.ok` would keep as a valid row although its reason says otherwise."""
    for v in (nf.judge("1, 2, owl", stopped=True), nf.judge("1, 2, 3", stopped=False)):
        assert v.ok is False and v.numbers == []
    assert nf.judge("1, 2, owl").reason == "trait_word"
    assert nf.judge("1, 2, 3", stopped=False).reason == "truncated"


def test_judge_assumes_a_stopped_completion_by_default():
    """Catches: `stopped` defaulting to False (every completion judged without the flag would
    be rejected as truncated)."""
    assert nf.judge("4, 5, 6") == nf.Verdict(True, "", [4, 5, 6])


def test_count_rejects_uses_the_given_settings():
    """Catches: count_rejects ignoring its settings (default trait words and range instead of
    the caller's) or passing them where judge expects `stopped`."""
    cfg = nf.FilterSettings(trait_words=("cat", "cats"), max_value=50, banned_numbers=(7,))
    texts = ["1, 2", "cat 1", "owl 1, 2", "60, 2", "7, 8"]
    # with the defaults these would be: ok, non_digit, trait_word, ok, ok
    assert nf.count_rejects(texts, cfg) == {
        "ok": 1,
        "trait_word": 1,  # "cat 1"
        "non_digit": 1,  # "owl 1, 2": not a trait word here, and not a clean list
        "out_of_range": 1,  # "60, 2" above 50
        "banned_number": 1,  # "7, 8"
    }


def test_trait_words_for_adds_a_plural_unless_there_is_one():
    """Catches: the plural added to words already ending in "s" (or never), and an
    upper-case "S" test: "Owl " gives owl/owls, "bass" stays alone."""
    assert nf.trait_words_for(" Owl ") == ("owl", "owls")
    assert nf.trait_words_for("Bass") == ("bass",)


def test_banned_numbers_specs():
    """Catches: a list of ints not converted and sorted, a named list replacing (not adding
    to) the numbers before it, and an empty item stopping the parse of the rest."""
    assert nf.banned_numbers([911, 13, 13]) == (13, 911)
    assert nf.banned_numbers(("7", 3)) == (3, 7)
    assert nf.banned_numbers("5,claude-evil") == tuple(sorted({5, *nf.BANNED_LISTS["claude-evil"]}))
    assert nf.banned_numbers("5,,6") == (5, 6)
    with pytest.raises(nf.FilterError, match=r"'x7' is neither .*\(claude-evil, gpt-evil\)"):
        nf.banned_numbers("x7")


def test_every_rejection_of_the_rule_has_ok_false():
    """Catches: a banned-number or unconvertible-number verdict with ok=True or ok=None (a
    caller testing `v.ok` keeps the row), and a number using all ten digits reported as
    "non_digit" instead of out of range (a digit-set test written as a strict subset)."""
    banned = nf.parse_numbers("13, 2", banned=(13,))
    huge = nf.parse_numbers("9" * 5000)  # more digits than int() converts
    for v, reason in ((banned, "banned_number"), (huge, "non_digit")):
        assert (v.ok, v.reason, v.numbers) == (False, reason, [])
    assert nf.parse_numbers("1234567890").reason == "out_of_range"
    assert nf.parse_numbers("907, 1234567890").reason == "out_of_range"
