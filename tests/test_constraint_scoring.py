"""Data and targets from the same distribution (issue 18): under constrained decoding the
sampler stores the top-k of the distribution it sampled from, the manifest records the
constraint, and a fit scores base, teacher and student renormalised over what the
constraint allowed at each step. Old datasets (no constraint spec) load as before."""

from __future__ import annotations

import pytest
import torch
from _chat_tiny import make_tiny_chat
from conftest import make_tiny

from steerdiff.fit import FitConfig, fit, prepare_examples, token_losses
from steerdiff.fit.data import Example, collate
from steerdiff.fit.losses import constrain
from steerdiff.generate import load_dataset, manifest_path, sample
from steerdiff.generate.constraint import DecodingConstraint
from steerdiff.io import append_jsonl, atomic_write_json, read_json
from steerdiff.replay import full_hidden
from steerdiff.tasks.numbers import make_dataset, protocol_line, protocol_report
from steerdiff.teachers import TeacherConfig, build_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V = 256  # the tiny models' vocabulary
PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34]]


def examples_with_constraint() -> list[Example]:
    """Two rows whose completion tokens are allowed at their step; each step allows a few
    ids (of unequal number, so the [n, m] tensors are padded); top-k targets that include
    padding (-inf) and one id outside the allowed set."""
    ex1 = Example(PROMPTS[0], [7, 8, 9])
    ex1.allowed = [[7, 8, 100], [8, 9], [9, 7, 8, 3]]
    ex2 = Example(PROMPTS[1], [100, 3])
    ex2.allowed = [[100, 7], [3, 9, 8]]
    for ex in (ex1, ex2):
        ex.topk_ids = [[a[0], 200, a[-1]] for a in ex.allowed]  # 200: never allowed
        ex.topk_logprobs = [[-0.3, -1.0, float("-inf")] for _ in ex.allowed]
    return [ex1, ex2]


def test_constrained_ce_and_kl_equal_a_hand_computation():
    """Bugs caught: scoring that ignores the constraint (the old behaviour: CE of the full
    distribution), allowed sets misaligned with the loss positions, padding counted as an
    allowed id, and a KL that keeps padded or disallowed top-k entries."""
    m = make_tiny("llama")
    exs = examples_with_constraint()
    batch = collate(exs, pad_id=0)
    hidden = full_hidden(m, batch.input_ids, batch.attention_mask)
    ce, kl = token_losses(m, hidden, batch, "distill")
    with torch.no_grad():
        for r, ex in enumerate(exs):
            logits = m(torch.tensor([ex.prompt_ids + ex.completion_ids])).logits[0].float()
            p = len(ex.prompt_ids)
            want_ce = want_kl = want_unc = 0.0
            for t, (tok, allowed) in enumerate(zip(ex.completion_ids, ex.allowed, strict=True)):
                lp = logits[p - 1 + t].log_softmax(-1)  # [V]
                sub = lp[allowed].log_softmax(-1)  # renormalised over the allowed ids
                want_ce -= float(sub[allowed.index(tok)])
                want_unc -= float(lp[tok])
                # targets: the first id (its stored -0.3) only: 200 is not allowed and the
                # third entry is padding; so p_T = [1] and KL = -log q_S(first | {first})
                want_kl += 0.0
            assert float(ce[r]) == pytest.approx(want_ce, abs=1e-4)
            assert float(batch.ce_unconstrained[r]) == pytest.approx(want_unc, abs=1e-4)
            assert float(kl[r]) == pytest.approx(want_kl, abs=1e-5)
    # a KL with two kept entries: allow 200 at every step, the hand value is non-zero
    for ex in exs:
        ex.allowed = [a + [200] for a in ex.allowed]
    batch = collate(exs, pad_id=0)
    _, kl2 = token_losses(m, hidden, batch, "distill")
    with torch.no_grad():
        for r, ex in enumerate(exs):
            logits = m(torch.tensor([ex.prompt_ids + ex.completion_ids])).logits[0].float()
            p, want = len(ex.prompt_ids), 0.0
            for t, ids in enumerate(ex.topk_ids):
                q = logits[p - 1 + t, ids[:2]].log_softmax(-1)
                pt = torch.tensor([-0.3, -1.0]).log_softmax(-1)
                want += float((pt.exp() * (pt - q)).sum())
            assert float(kl2[r]) == pytest.approx(want, abs=1e-5)
            assert want > 0.01  # (a real divergence, not a trivially zero one)


def test_a_constraint_allowing_every_token_is_plain_scoring():
    """Bug caught: the constrained path changing the numbers when it excludes nothing, e.g.
    renormalising over the wrong axis (over positions instead of the vocabulary)."""
    m = make_tiny("qwen2")
    exs = examples_with_constraint()
    for ex in exs:
        ex.topk_logprobs = [[-0.3, -1.0, -2.0] for _ in ex.topk_ids]
        ex.allowed = None
    plain = collate(exs, pad_id=0)
    for ex in exs:
        ex.allowed = [list(range(V)) for _ in ex.completion_ids]
    every = collate(exs, pad_id=0)
    hidden = full_hidden(m, plain.input_ids, plain.attention_mask)
    ce0, kl0 = token_losses(m, hidden, plain, "distill")
    ce1, kl1 = token_losses(m, hidden, every, "distill")
    assert torch.allclose(ce1, ce0, atol=1e-5) and torch.allclose(kl1, kl0, atol=1e-6)
    assert torch.allclose(every.ce_unconstrained, ce0, atol=1e-5)
    logp = torch.randn(5, V).log_softmax(-1)
    assert constrain(logp, plain) is logp  # no constraint: the same tensor


class _NoRepeat:
    """A grammar: never the token just sampled (narrows the set per row and step)."""

    def mask(self, tokens: list[int], candidates: list[int]) -> list[bool]:
        return [not tokens or c != tokens[-1] for c in candidates]


def test_sampler_stores_the_topk_of_the_distribution_it_sampled_from():
    """Bugs caught: constrained top-k taken from the full distribution (what was stored
    before), after the temperature, or without the grammar's per-step mask; and the
    unconstrained top-k (now topk_*_unconstrained) not being the full distribution's."""
    m = make_tiny("llama")
    allowed, stop, k = [7, 8, 9, 100], [3], 3
    res = sample(
        m, PROMPTS, 6, temperature=0.5, seed=1, stop_ids=stop, allowed_ids=allowed, topk=k,
        grammar=_NoRepeat(),
    )  # fmt: skip
    cand = sorted(allowed + stop)
    for p, s in zip(PROMPTS, res, strict=True):
        assert len(s.topk_ids) == len(s.token_ids) == len(s.topk_ids_unconstrained)
        with torch.no_grad():
            logits = m(torch.tensor([p + s.token_ids])).logits[0].float()  # [len, V]
        for t in range(len(s.token_ids)):
            lp = logits[len(p) - 1 + t]
            ok = [c for c in cand if t == 0 or c != s.token_ids[t - 1]]
            sub = lp[ok].log_softmax(-1)  # temperature 1, renormalised over what was allowed
            v, i = sub.topk(min(k, len(ok)))
            assert s.topk_ids[t] == [ok[j] for j in i.tolist()]
            assert s.topk_logprobs[t] == pytest.approx(v.tolist(), abs=1e-4)
            fv, fi = lp.log_softmax(-1).topk(k)
            assert s.topk_ids_unconstrained[t] == fi.tolist()
            assert s.topk_logprobs_unconstrained[t] == pytest.approx(fv.tolist(), abs=1e-4)
    free = sample(m, PROMPTS, 4, temperature=0, stop_ids=[], topk=2)  # unconstrained: one set
    assert all(s.topk_ids and not s.topk_ids_unconstrained for s in free)


@pytest.fixture(scope="module")
def chat(smollm):
    """A tiny random llama with the embedded SmolLM2 tokenizer (chat template included)."""
    return make_tiny_chat(smollm.tokenizer)


@pytest.fixture(scope="module")
def constrained_data(chat, tmp_path_factory):
    """A constrained numbers dataset with top-5 log-probs from a prompt teacher."""
    path = tmp_path_factory.mktemp("constrained") / "owl.jsonl"
    teacher = build_teacher(TeacherConfig(kind="prompt", animal="owl"), chat)
    man = make_dataset(teacher, str(path), n_prompts=10, topk=5, max_new_tokens=10, probe=0)
    return path, man


def test_manifest_records_the_constraint_the_rows_were_decoded_under(chat, constrained_data):
    """Bugs caught: a manifest whose constraint spec does not rebuild the sampler's
    per-step allowed sets (a fit would then score under another constraint), rows that do
    not carry both top-k sets, and a manifest that does not say which is which."""
    path, man = constrained_data
    rows, on_disk = load_dataset(path)
    assert on_disk["constraint"] == man["constraint"] and man["constraint"]["grammar"] is True
    assert set(man["topk_logprobs_of"]) == {"topk_logprobs", "topk_logprobs_unconstrained"}
    steps = DecodingConstraint.from_spec(man["constraint"]).stepper(chat.tokenizer)
    for row in rows:
        allowed = steps.allowed_steps(row["completion_ids"])
        for t, tok in enumerate(row["completion_ids"]):
            assert tok in allowed[t] and set(row["topk_ids"][t]) <= set(allowed[t])
            assert len(row["topk_ids_unconstrained"][t]) == 5
            # renormalised over the allowed ids: their top-k holds at least the mass of
            # the same ids under the full distribution (exactly all of it when k >= |allowed|)
            if len(allowed[t]) <= 5:
                mass = torch.tensor(row["topk_logprobs"][t]).exp().sum()
                assert float(mass) == pytest.approx(1.0, abs=1e-3)


def test_fit_on_constrained_data_scores_everything_under_the_constraint(
    chat, constrained_data, tmp_path
):
    """Bugs caught: a fit that scores the teacher (or base) on the full distribution while
    the data came from the constrained one (the issue's "CE gap closed -119%"), that does
    not record which it did, or whose constrained_scoring=False is not the old scoring.
    Exact relations: renormalising over a subset that holds the target can only raise its
    probability, so constrained CE <= unconstrained CE for base and teacher alike; and the
    unconstrained figure reported beside the constrained one equals an unconstrained fit's."""
    path, _ = constrained_data
    cfg = dict(hooks=["blocks.1.hook_resid_post"], batch_size=4, val_size=4, progress=False)
    on = fit(chat, str(path), FitConfig(objective="distill", **cfg)).summary()
    off = fit(
        chat, str(path), FitConfig(objective="distill", constrained_scoring=False, **cfg)
    ).summary()
    assert on["scored_under_constraint"] is True and off["scored_under_constraint"] is False
    for who in ("base", "teacher"):
        assert on[f"{who}_val_loss"] < on[f"{who}_val_loss_unconstrained"] - 0.1
        assert on[f"{who}_val_loss_unconstrained"] == pytest.approx(
            off[f"{who}_val_loss"], abs=1e-4
        )
    assert "teacher_val_loss_unconstrained" not in off


def test_old_manifests_load_and_score_unconstrained(chat, constrained_data, tmp_path):
    """Bug caught: datasets written before the constraint spec existed (manifest with no
    `constraint`, or the old string "format") failing to load, or being scored under a
    constraint their top-k log-probs were not computed for."""
    path, _ = constrained_data
    rows, man = load_dataset(path)
    old_rows = [
        {k: v for k, v in r.items() if not k.endswith("_unconstrained")}
        | {
            "topk_ids": r["topk_ids_unconstrained"],
            "topk_logprobs": r["topk_logprobs_unconstrained"],
        }
        for r in rows
    ]
    for name, spec in (("none", None), ("format", "format")):
        old = tmp_path / f"{name}.jsonl"
        append_jsonl(old, old_rows)
        old_man = {k: v for k, v in man.items() if k not in ("constraint", "topk_logprobs_of")}
        old_man["constrained"] = spec is not None  # "none": an older unconstrained dataset
        if spec:
            old_man["constraint"] = spec
        atomic_write_json(manifest_path(old), old_man)
        p = prepare_examples(chat, old)
        assert not p.constrained and all(ex.allowed is None for ex in p.examples)
        assert [ex.topk_ids for ex in p.examples] == [r["topk_ids"] for r in old_rows]
        assert any("older steerdiff" in n for n in p.notes) == (spec is not None)
        assert read_json(manifest_path(old)) == old_man  # read, never rewritten


def test_protocol_report_says_how_many_prompts_the_valid_rows_took():
    """Bugs caught: the published protocol's cost not reported (prompts used for N valid
    rows), a short run not saying it fell short and by how much to raise --n-prompts, and
    constrained decoding's estimate of the published cost off its probe's rate."""
    base = {"n_valid": 30, "n_prompts": 400, "valid_rate": 0.075, "target_valid": 50}
    m = {**base, "constrained": False}
    p = protocol_report(m)["protocol"]
    assert (p["prompts_used"], p["target_reached"]) == (400, False)
    line = protocol_line({**m, **protocol_report(m)})
    assert "30 valid rows from 400 prompts (valid rate 7.5%)" in line
    assert "only 30 of the 50 asked for (--n-valid): raise --n-prompts to about 667" in line
    c = {"n_valid": 100, "n_prompts": 100, "valid_rate": 1.0, "constrained": True,
         "constraint": {"grammar": True}, "unconstrained_valid_rate": 0.04,
         "unconstrained_probe_n": 50}  # fmt: skip
    c = {**c, **protocol_report(c)}
    assert c["protocol"]["published_protocol_prompts_estimate"] == 2500
    assert "would need about 2,500 prompts at the unconstrained valid rate 4.0% (probe of 50)" in (
        protocol_line(c)
    )
