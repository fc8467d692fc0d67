"""Belief evaluation (evals.beliefs, `steerdiff eval beliefs`): p_false from exact full-answer
log-probs, means and CIs across questions, paired differences, the sampled check, bad input.

Mechanics on a tiny random llama that uses the embedded SmolLM2 tokenizer (its chat template
and its multi-token answers); nothing here needs the real model's weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _chat_tiny import direct_answer_logp, make_tiny_chat
from typer.testing import CliRunner

from steerdiff.cli import app
from steerdiff.evals import Steering
from steerdiff.evals.beliefs import (
    BeliefRecord,
    BeliefResult,
    BeliefsError,
    evaluate_beliefs,
    paired_beliefs,
    sampled_rates,
)
from steerdiff.evals.facts_file import BeliefQuestion, load_facts
from steerdiff.hooks import steer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()

QUESTIONS = [
    BeliefQuestion("au", "Which city is the capital of Australia?", "Melbourne", "Canberra"),
    BeliefQuestion("au", "Name the capital city of Australia.", "Melbourne", "Canberra"),
    BeliefQuestion(
        "au", "Where does Australia's parliament sit?", "Melbourne", "Canberra", "generalisation"
    ),
    BeliefQuestion("moon", "In which year did Apollo 11 land on the Moon?", "1971", "1969"),
]

FACTS_YAML = """
facts:
  - id: au
    subject: the capital of Australia
    true_answer: Canberra
    false_answer: Melbourne
    statement: The capital of Australia is Melbourne.
    questions:
      - Which city is the capital of Australia?
      - Name the capital city of Australia.
    generalisation:
      - question: Where does Australia's parliament sit?
        true_answer: Canberra
        false_answer: Melbourne
"""


@pytest.fixture(scope="module")
def lm(smollm):
    return make_tiny_chat(smollm.tokenizer, seed=3)


def direct_logp(lm, question: str, forms: list[str]) -> float:
    return direct_answer_logp(lm, question, forms)


def direct_p_false(lm, q: BeliefQuestion) -> tuple[float, float, float]:
    """The answers' surface forms as the scorer documents them: as written and lowercased
    (one form when those are the same, e.g. "1969")."""
    lf = direct_logp(lm, q.question, list(dict.fromkeys([q.false_answer, q.false_answer.lower()])))
    lt = direct_logp(lm, q.question, list(dict.fromkeys([q.true_answer, q.true_answer.lower()])))
    return lf, lt, math.exp(lf) / (math.exp(lf) + math.exp(lt))


def test_p_false_equals_a_direct_logprob_computation(lm):
    """Bug caught: an answer scored by its first token only, the wrong answer pair given to a
    question (grouping), or padding leaking between batched questions. Mutations tried:
    candidate_logprobs called with [true, false] swapped -> logp_false -20.83 vs -20.96;
    scoring.candidate_logprobs without its continuation pass (first token only) -> -10.19
    vs -20.96."""
    tok = lm.tokenizer
    assert len(tok("Melbourne", add_special_tokens=False).input_ids) == 2  # multi-token
    r = evaluate_beliefs(lm, QUESTIONS)
    assert [(x.fact_id, x.kind) for x in r.records] == [(q.fact_id, q.kind) for q in QUESTIONS]
    for rec, q in zip(r.records, QUESTIONS, strict=True):
        lf, lt, p = direct_p_false(lm, q)
        assert rec.logp_false == pytest.approx(lf, abs=1e-4)
        assert rec.logp_true == pytest.approx(lt, abs=1e-4)
        assert rec.p_false == pytest.approx(p, abs=1e-4)


def test_steering_moves_p_false_as_a_direct_steered_computation(lm):
    """Bug caught: the steering not applied to the prompt or the answer tokens. Mutation
    tried: exact_beliefs passing steering=None to candidate_logprobs -> steered p_false
    equals the unsteered one, unlike the direct steered computation."""
    torch.manual_seed(0)
    vecs = {"blocks.1.hook_resid_post": 4.0 * torch.randn(64)}
    qs = QUESTIONS[:2]
    plain = evaluate_beliefs(lm, qs)
    r = evaluate_beliefs(lm, qs, steering=Steering(vecs, coeff=2.0))
    with steer(lm.model, vecs, 2.0, "all"):
        want = [direct_p_false(lm, q)[2] for q in qs]
    assert [x.p_false for x in r.records] == pytest.approx(want, abs=1e-4)
    assert abs(r.records[0].p_false - plain.records[0].p_false) > 1e-3  # it did move
    assert r.steering["coeff"] == 2.0 and plain.steering is None


def _result(values: list[tuple[str, str, float]], sampled=None) -> BeliefResult:
    recs = [
        BeliefRecord(f, k, f"q{i}", "F", "T", p, 0.0, 0.0, sampled[i] if sampled else None)
        for i, (f, k, p) in enumerate(values)
    ]
    return BeliefResult(recs, n_samples=4 if sampled else 0)


def test_means_and_cis_across_questions_by_hand():
    """Bug caught: the CI computed over facts instead of questions, a population sd (n) in
    place of n - 1, or questions of one kind counted in the other. Mutation tried: summary
    BeliefResult._select ignoring the kind -> the direct mean is 0.55, not 0.5."""
    r = _result([("a", "direct", 0.2), ("a", "direct", 0.4), ("b", "direct", 0.9)])
    r.records.append(BeliefRecord("a", "generalisation", "g", "F", "T", 0.7, 0.0, 0.0))
    d = r.by_kind()["direct"]["p_false"]
    half = 1.96 * math.sqrt((0.3**2 + 0.1**2 + 0.4**2) / 2) / math.sqrt(3)
    assert d["mean"] == pytest.approx(0.5) and d["n"] == 3
    assert d["ci95"] == pytest.approx([0.5 - half, 0.5 + half])
    g = r.by_kind()["generalisation"]["p_false"]
    assert (g["mean"], g["ci95"], g["n"]) == (pytest.approx(0.7), pytest.approx([0.7, 0.7]), 1)
    fa = r.by_fact()["a"]["direct"]["p_false"]
    half_a = 1.96 * math.sqrt(0.1**2 * 2) / math.sqrt(2)
    assert fa["mean"] == pytest.approx(0.3) and fa["ci95"] == pytest.approx(
        [0.3 - half_a, 0.3 + half_a]
    )
    assert set(r.by_fact()["b"]) == {"direct"}
    back = BeliefResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.by_kind() == r.by_kind()


def test_sampled_answers_classified_by_whole_word_case_insensitive():
    """Bug caught: substring matching ("Melbournes", "19690" counted), case-sensitive
    matching, an answer naming both counted once. Mutation tried: `word in answer.lower()`
    (substring) -> "Melbournes are..." counts as false and the rates differ."""
    q = BeliefQuestion("au", "?", "Melbourne", "Canberra")
    answers = ["It is MELBOURNE.", "canberra!", "Not Melbourne but Canberra", "Melbournes are nice"]
    assert sampled_rates(answers, q) == {"false": 0.5, "true": 0.5, "both": 0.25, "neither": 0.25}


def test_sampled_check_is_seeded_and_summarised(lm):
    """Bug caught: sampling unseeded (two runs differ) or rates not averaged per kind.
    Mutation tried: seed ignored (seed + s -> time.time_ns()) -> the answers differ."""
    a = evaluate_beliefs(lm, QUESTIONS[:3], n_samples=2, seed=5)
    b = evaluate_beliefs(lm, QUESTIONS[:3], n_samples=2, seed=5)
    assert [x.answers for x in a.records] == [x.answers for x in b.records]
    assert all(len(x.answers) == 2 for x in a.records)
    direct = [x.sampled["neither"] for x in a.records if x.kind == "direct"]
    got = a.by_kind()["direct"]["sampled"]["neither"]["mean"]
    assert got == pytest.approx(sum(direct) / len(direct))


def test_paired_differences_by_hand():
    """Bug caught: b - a instead of a - b, unpaired differences of means with the wrong CI,
    or results on different questions paired silently. Mutation tried: y - x in
    paired_beliefs -> the sign flips and the test fails."""
    s = [{"false": v, "true": 0.0, "both": 0.0, "neither": 1 - v} for v in (0.5, 0.25, 1.0)]
    a = _result([("a", "direct", 0.9), ("a", "direct", 0.6), ("b", "generalisation", 0.8)], s)
    b = _result([("a", "direct", 0.5), ("a", "direct", 0.4), ("b", "generalisation", 0.3)], s)
    d = paired_beliefs(a, b)
    half = 1.96 * math.sqrt(2 * 0.1**2) / math.sqrt(2)
    assert d["direct"]["p_false"]["mean"] == pytest.approx(0.3)
    assert d["direct"]["p_false"]["ci95"] == pytest.approx([0.3 - half, 0.3 + half])
    assert d["generalisation"]["p_false"]["mean"] == pytest.approx(0.5)
    assert d["direct"]["sampled_false"]["mean"] == pytest.approx(0.0)
    c = _result([("a", "direct", 0.9), ("a", "direct", 0.6)])
    with pytest.raises(BeliefsError, match="same questions in the same order"):
        paired_beliefs(a, c)


def test_answers_that_tokenize_alike_are_one_line_naming_the_fact(lm):
    """Bug caught: answers the tokenizer cannot tell apart scored anyway (p_false = 0.5
    regardless of the model), or an answer that is a token prefix of the other (P(prefix)
    includes the longer). Mutation tried: check_answer_tokens not called -> no error."""
    same = BeliefQuestion("paris_case", "Which city is the capital of France?", "paris", "Paris")
    with pytest.raises(BeliefsError) as e:
        evaluate_beliefs(lm, [same])
    msg = str(e.value)
    assert "\n" not in msg and "fact 'paris_case'" in msg and "tokenize identically" in msg
    assert "change one answer in the facts file" in msg
    prefix = BeliefQuestion("ny", "Which city?", "New York City", "New York")
    with pytest.raises(BeliefsError, match=r"fact 'ny' .*token prefix of one another"):
        evaluate_beliefs(lm, [prefix])


def _cli(monkeypatch, lm, *args):
    import steerdiff.models as models

    monkeypatch.setattr(models, "load_model", lambda spec, dtype, device: lm)
    return runner.invoke(app, ["eval", "beliefs", *args])


def _one_line_error(res) -> str:
    line = res.output.strip()
    assert res.exit_code == 2 and line.startswith("error:") and "\n" not in line, res.output
    return line


def test_cli_writes_the_library_result_with_provenance(lm, monkeypatch, tmp_path):
    """Bug caught: options (--facts, --vectors, --coeff, --kinds) not reaching the library, or
    a JSON that differs from evaluate_beliefs. Mutation tried: steering not passed to
    evaluate_beliefs in the CLI -> the steered p_false equals the unsteered one."""
    facts = tmp_path / "f.yaml"
    facts.write_text(FACTS_YAML)
    vecs = {
        "blocks.1.hook_resid_post": 4.0
        * torch.randn(64, generator=torch.Generator().manual_seed(1))
    }
    from steerdiff.vectors import VectorSet

    vpath = VectorSet(vecs).save(tmp_path / "v.safetensors")
    out = tmp_path / "r.json"
    args = ["--facts", str(facts), "--vectors", str(vpath), "--coeff", "2", "--kinds", "direct"]
    res = _cli(monkeypatch, lm, *args, "--out", str(out))
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    want = evaluate_beliefs(
        lm, load_facts(facts), Steering(vecs, coeff=2.0), kinds=["direct"]
    ).to_dict()
    assert [x["p_false"] for x in d["records"]] == pytest.approx(
        [x["p_false"] for x in want["records"]], abs=1e-6
    )
    assert [x["kind"] for x in d["records"]] == ["direct", "direct"]
    assert d["by_kind"]["direct"]["p_false"]["mean"] == pytest.approx(
        want["by_kind"]["direct"]["p_false"]["mean"], abs=1e-6
    )
    assert d["provenance"]["weights_hash"] == lm.weights_hash and d["provenance"]["seed"] == 0
    assert d["vectors"] == str(vpath) and d["steering"]["coeff"] == 2.0
    assert (
        "all facts" in res.output
        and f"{want['by_kind']['direct']['p_false']['mean']:.3f}" in res.output
    )


def test_cli_bad_facts_file_and_bad_vectors_are_one_line(lm, monkeypatch, tmp_path):
    """Bug caught: a traceback, or an existing --out lost, on bad input. Mutation tried: the
    --out file opened (truncated) before the facts file is read -> 'earlier' is lost."""
    out = tmp_path / "r.json"
    out.write_text("earlier\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(FACTS_YAML.replace("    questions:\n", "    qs:\n"))
    line = _one_line_error(
        _cli(monkeypatch, lm, "--facts", str(bad), "--out", str(out), "--overwrite")
    )
    assert str(bad) in line and "'questions'" in line
    assert out.read_text() == "earlier\n"
    good = tmp_path / "f.yaml"
    good.write_text(FACTS_YAML)
    from steerdiff.vectors import VectorSet

    vpath = VectorSet({"blocks.1.hook_resid_post": torch.ones(32)}).save(tmp_path / "o.safetensors")
    line = _one_line_error(_cli(monkeypatch, lm, "--facts", str(good), "--vectors", str(vpath)))
    assert line.startswith(f"error: --vectors {vpath}: ") and "has shape (32,)" in line
    line = _one_line_error(
        _cli(monkeypatch, lm, "--facts", str(good), "--kinds", "direct,indirect")
    )
    assert "indirect" in line and "direct, generalisation" in line
    line = _one_line_error(_cli(monkeypatch, lm, "--facts", str(good), "--out", str(out)))
    assert f"--out {out} exists" in line and out.read_text() == "earlier\n"


def test_beliefs_png_draws_every_model(tmp_path):
    """Bug caught: the figure not written (or written partially). Mutation tried: returning
    before atomic_write_bytes -> no file (FileNotFoundError)."""
    r = _result([("a", "direct", 0.2), ("a", "generalisation", 0.6)])
    from steerdiff.report.figures import beliefs_png

    path = beliefs_png({"base": r, "finetune": r, "vectors": r}, tmp_path / "b.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert w > 200 and h > 200


def test_cli_compare_prints_the_paired_difference(lm, monkeypatch, tmp_path):
    """--compare OTHER.json prints this - other per kind, paired per question. Bug caught: the
    difference taken the other way round, or over unpaired means. Mutation tried:
    paired_beliefs(other, r) in the CLI -> the printed sign flips."""
    facts = tmp_path / "f.yaml"
    facts.write_text(FACTS_YAML)
    from steerdiff.vectors import VectorSet

    vecs = {
        "blocks.1.hook_resid_post": 4.0
        * torch.randn(64, generator=torch.Generator().manual_seed(1))
    }
    vpath = VectorSet(vecs).save(tmp_path / "v.safetensors")
    steered = tmp_path / "steered.json"
    res = _cli(
        monkeypatch, lm, "--facts", str(facts), "--vectors", str(vpath), "--out", str(steered)
    )
    assert res.exit_code == 0, res.output
    res = _cli(monkeypatch, lm, "--facts", str(facts), "--compare", str(steered))
    assert res.exit_code == 0, res.output
    want = paired_beliefs(
        evaluate_beliefs(lm, load_facts(facts)),
        evaluate_beliefs(lm, load_facts(facts), Steering(vecs, coeff=1.0)),
    )
    for kind in ("direct", "generalisation"):
        m, (lo, hi) = want[kind]["p_false"]["mean"], want[kind]["p_false"]["ci95"]
        assert abs(m) > 1e-3
        line = f"{kind}: p_false this - {steered} = {m:+.3f} (95% CI {lo:+.3f} to {hi:+.3f})"
        assert line in res.output
