"""Token entanglement (interpret.entanglement, `steerdiff read entanglement`): exact number
log-probs, the ranking, dataset frequencies, subliminal prompts, one-line errors."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from _chat_tiny import make_tiny_chat
from typer.testing import CliRunner

from steerdiff.cli import app
from steerdiff.interpret.entanglement import (
    EntanglementError,
    frequency_shift,
    number_logprobs,
    rank_entangled,
    token_entanglement,
)
from steerdiff.interpret.subliminal import (
    control_numbers,
    number_system_prompt,
    subliminal_prompting,
)
from steerdiff.teachers import build_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()
USERS = ["Here is a list of numbers: 512, 127. Continue it.", "Start: 901, 33. Add more."]


@pytest.fixture(scope="module")
def chat(smollm):
    """A tiny random llama with SmolLM2's tokenizer (real digit tokens, chat template)."""
    return make_tiny_chat(smollm.tokenizer)


def _direct_logprob(lm, prompt: list[int], number: str) -> float:
    """log P(number as the answer's first number) from one plain forward over prompt +
    digits: the digits' log-probs, plus P(a non-digit next) for 1-2 digit numbers."""
    tok = lm.tokenizer
    digits = [tok(d, add_special_tokens=False)["input_ids"][0] for d in "0123456789"]
    ids = torch.tensor([prompt + [digits[int(c)] for c in number]])
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(ids).logits[0].float(), -1)
    p = len(prompt)
    total = sum(float(lp[p - 1 + i, digits[int(c)]]) for i, c in enumerate(number))
    if len(number) < 3:
        rest = torch.ones(lp.shape[-1], dtype=torch.bool)
        rest[digits] = False
        total += float(torch.logsumexp(lp[p - 1 + len(number)][rest], 0))
    return total


def test_log_ratio_equals_two_plain_forwards(chat):
    """Each number's log-ratio is the mean over prompts of log P(n | trait system prompt) -
    log P(n | none), each from a plain forward over prompt + digits, and every 1-3 digit
    number's probabilities sum to P(the answer starts with a digit). Bug caught: the wrong
    row read for P(b | a) (mutation tried: d[:10, 1] for d[::10, 1] -> a log-ratio of
    0.090 where the forwards give 0.109)."""
    res = token_entanglement(chat, "owl", USERS, top=1000, min_prob=0.0)
    trait = build_teacher({"kind": "prompt", "animal": "owl"}, chat)
    plain = build_teacher({"kind": "plain"}, chat)
    by_number = {e.number: e for e in res.top}
    assert len(by_number) == 1000
    for n in ["0", "7", "42", "123", "990"]:
        per = [
            _direct_logprob(chat, trait.prompt_ids(u), n)
            - _direct_logprob(chat, plain.prompt_ids(u), n)
            for u in USERS
        ]
        assert by_number[n].log_ratio == pytest.approx(sum(per) / 2, abs=2e-4)
        assert res.all_log_ratios[int(n)] == pytest.approx(sum(per) / 2, abs=2e-4)
    lp = number_logprobs(plain, USERS[:1])
    digits = [chat.tokenizer(d, add_special_tokens=False)["input_ids"][0] for d in "0123456789"]
    with torch.no_grad():
        first = torch.log_softmax(
            chat.model(torch.tensor([plain.prompt_ids(USERS[0])])).logits[0, -1], -1
        )
    # the 3-digit numbers' ends are not scored: all numbers = P(digit) minus P("0"+digit)
    p0_digit = float(first[digits[0]].exp()) - float(lp[0, 0].exp())
    assert float(lp[0].exp().sum()) == pytest.approx(
        float(first[digits].exp().sum()) - p0_digit, rel=1e-4
    )


def test_planted_entanglement_is_ranked_first(chat):
    """A steered teacher that adds the unembedding row of digit '7' at the last block makes
    every 7 likelier: '777' (three 7s) must rank first and '7'-free numbers must not show up.
    Bug caught: base and teacher swapped, or the ranking ascending (mutation tried:
    rank_entangled(base_lp, teacher_lp) -> top[0] = '222', not '777')."""
    seven = chat.tokenizer("7", add_special_tokens=False)["input_ids"][0]
    w = chat.model.get_output_embeddings().weight[seven].detach().clone()
    hook = "blocks.2.hook_resid_post"
    teacher = build_teacher({"kind": "steered", "vectors": {hook: 8 * w}, "coeff": 1.0}, chat)
    res = token_entanglement(chat, "owl", USERS, top=5, min_prob=0.0, teacher=teacher)
    assert res.top[0].number == "777"
    assert res.top[0].ci95[0] > 1.0  # a clear rise on both prompts
    assert all("7" in e.number for e in res.top)
    with pytest.raises(EntanglementError, match=r"lower min_prob \(--min-prob\)"):
        token_entanglement(chat, "owl", USERS[:1], min_prob=0.5, teacher=teacher)


def test_rank_leaves_out_unlikely_numbers():
    """Numbers below min_prob under the teacher are not ranked, however large their ratio;
    the base's probability does not matter. Bug caught: the filter on the base's
    probability instead of the teacher's (mutation tried: p_b for p_t -> '300', likely
    under the teacher and 20,000x its base probability, left out)."""
    base = torch.full((2, 1000), math.log(1e-3))
    teacher = base.clone()
    teacher[:, 5] = math.log(1e-6)  # unlikely under the teacher
    base[:, 5] = math.log(1e-9)  # ratio 1000x
    teacher[:, 300] = math.log(2e-3)  # likely under the teacher ...
    base[:, 300] = math.log(1e-7)  # ... and unlikely under the base: ratio 20,000x
    teacher[:, 250] = math.log(2e-3)  # ratio 2x, likely
    top, n_ranked = rank_entangled(teacher, base, top=3, min_prob=1e-4)
    assert [e.number for e in top][:2] == ["300", "250"] and n_ranked == 999
    assert top[0].log_ratio == pytest.approx(math.log(2e4), abs=1e-5)
    assert top[1].log_ratio == pytest.approx(math.log(2), abs=1e-6)


class _Fake:
    def __init__(self, rates):
        self.per_question = [{"target_rate": r} for r in rates]
        self.target_rate = sum(rates) / len(rates)
        self.ci95 = (0.0, 1.0)


def test_subliminal_prompts_hold_exactly_the_chosen_numbers():
    """The entangled condition's system prompt holds exactly the chosen numbers; each random
    control has numbers of the same lengths, none entangled or excluded; no system prompt
    for 'none'; the paired differences are the per-question means. Bug caught: control
    numbers drawn without the exclusion (mutation tried: banned = set() -> controls ['2',
    '8'], not the only allowed '0'/'9')."""
    seen: list[str | None] = []

    def score(sp):
        seen.append(sp)
        if sp is None:
            return _Fake([0.1, 0.1])
        return _Fake([0.3, 0.5] if "1, 2" in sp else [0.1, 0.2])

    nums, exclude = ["1", "2"], [str(d) for d in range(3, 9)]
    res = subliminal_prompting("Owl", nums, score, n_controls=2, exclude=exclude)
    assert seen[0] == number_system_prompt(nums) and seen[-1] is None and len(seen) == 4
    assert sorted(set(re.findall(r"\d+", seen[0]))) == nums
    for sp, c in zip(seen[1:3], res.controls, strict=True):
        assert sorted(set(re.findall(r"\d+", sp))) == sorted(c.numbers) == ["0", "9"]
    assert res.trait == "owl" and res.random_rate == pytest.approx(0.15)
    assert res.entangled_minus_random[0] == pytest.approx(0.25)
    sd = math.sqrt(((0.2 - 0.25) ** 2 + (0.3 - 0.25) ** 2) / 1)
    half = 1.96 * sd / math.sqrt(2)
    assert res.entangled_minus_random[1] == pytest.approx((0.25 - half, 0.25 + half))
    assert res.entangled_minus_none[0] == pytest.approx(0.3)
    assert [len(x) for x in control_numbers(["7", "42", "123"], 5)] == [1, 2, 3]


def _dataset(path, answers):
    rows = [
        {"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": a}]}
        for a in answers
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path.with_name(path.stem + ".manifest.json").write_text("{}")
    return str(path)


def test_frequency_shift_counts_whole_numbers(tmp_path):
    """Counts are of whole numbers as written ('7' is not counted inside '17' or '700'),
    rates over all numbers of each dataset. Bug caught: digits counted instead of numbers
    (mutation tried: r'\\d' for r'\\d+' -> 8 + 3 numbers counted as 12 + 5)."""
    t = _dataset(tmp_path / "t.jsonl", ["7, 17, 700", "7;12", "3 4 5"])
    b = _dataset(tmp_path / "b.jsonl", ["12, 13", "7"])
    fs = frequency_shift(["7", "12"], t, b, n_boot=200)
    seven, twelve = fs.numbers
    assert (fs.teacher_numbers, fs.base_numbers) == (8, 3)
    assert (seven.teacher_count, seven.base_count, twelve.teacher_count) == (2, 1, 1)
    assert seven.teacher_rate == pytest.approx(2 / 8) and seven.base_rate == pytest.approx(1 / 3)
    assert seven.log_ratio == pytest.approx(math.log(2.5 / 8) - math.log(1.5 / 3))
    assert fs.set_difference == pytest.approx(3 / 8 - 2 / 3)


def _one_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1, res.output
    return lines[0]


def test_cli_bad_trait_and_missing_dataset_are_one_line(tmp_path, monkeypatch):
    """A trait outside the animals, a missing dataset, and one dataset without the other are
    one line naming the option or file and the fix (exit 2), before any model is loaded;
    an earlier result in --out is left as it was. Bug caught: the dataset checked only after
    the scoring (mutation tried: no up-front load_dataset -> the model is loaded: exit 1)."""
    import steerdiff.models as models

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(models, "load_model", no_model)
    out = tmp_path / "o"
    out.mkdir()
    (out / "entanglement.json").write_text("earlier\n")
    line = _one_line(runner.invoke(app, ["read", "entanglement", "--trait", "unicorn"]))
    assert "bad option --trait: 'unicorn' is not one of owl, cat" in line and "pick one" in line
    line = _one_line(runner.invoke(app, ["read", "entanglement", "--trait", "o1"]))
    assert "Bad trait 'o1'" in line and "--trait owl" in line
    base = _dataset(tmp_path / "b.jsonl", ["1, 2"])
    missing = tmp_path / "nope.jsonl"
    args = ["read", "entanglement", "--trait", "owl", "--out", str(out)]
    line = _one_line(
        runner.invoke(app, [*args, "--teacher-data", str(missing), "--base-data", base])
    )
    assert f"Dataset not found: {missing}" in line and "steerdiff generate" in line
    line = _one_line(runner.invoke(app, [*args, "--base-data", base]))
    assert "--teacher-data and --base-data go together" in line
    assert (out / "entanglement.json").read_text() == "earlier\n"


def test_cli_writes_the_library_figures(chat, monkeypatch, tmp_path):
    """`read entanglement` writes entanglement.json (the library's ranking, frequencies and
    shares) and the bar plot. Bug caught: --top or the datasets not reaching the library
    (mutation tried: top=5 hard-coded -> 5 numbers, not 3)."""
    import steerdiff.models as models
    from steerdiff.tasks.numbers import make_prompts

    monkeypatch.setattr(models, "load_model", lambda *a, **k: chat)
    t = _dataset(tmp_path / "t.jsonl", ["1, 2, 3"])
    b = _dataset(tmp_path / "b.jsonl", ["4, 5"])
    out = tmp_path / "o"
    args = ["read", "entanglement", "--trait", "cat", "--prompts", "1", "--top", "3"]
    args += ["--questions", "2", "--controls", "1", "--min-prob", "0", "--out", str(out)]
    res = runner.invoke(app, [*args, "--teacher-data", t, "--base-data", b])
    assert res.exit_code == 0, res.output
    d = json.loads((out / "entanglement.json").read_text())
    want = token_entanglement(chat, "cat", make_prompts(1), top=3, min_prob=0.0)
    assert [e["number"] for e in d["entanglement"]["top"]] == want.numbers()
    got = [e["log_ratio"] for e in d["entanglement"]["top"]]
    assert got == pytest.approx([e.log_ratio for e in want.top], abs=1e-6)
    assert d["frequencies"]["teacher_numbers"] == 3 and d["subliminal"]["n_questions"] == 2
    assert d["subliminal"]["entangled"]["numbers"] == want.numbers()
    assert (out / "entanglement.png").read_bytes()[:4] == b"\x89PNG"
