"""fit.alignment (the student's activation shift vs the teacher's vector, logged during a
finetune) and fit.baselines.perturbed_copy (the different-initialisation control)."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import make_tiny
from test_train import HOOK, QUICK, steered_data, teacher  # noqa: F401  (fixture)

from steerdiff.fit import FitConfig, LoraConfig, fit_full, fit_lora
from steerdiff.fit.alignment import (
    AlignmentLogger,
    activation_shift,
    alignment_figures,
    mean_activation,
)
from steerdiff.fit.baselines import perturbed_copy
from steerdiff.hooks import record, steer
from steerdiff.models import wrap_model

torch.set_num_threads(1)
PROBE = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [100, 3, 7, 9, 200]]  # unequal lengths


@torch.no_grad()
def hand_mean(m: torch.nn.Module, probe: list[list[int]], hook: str, last: bool = False):
    """Mean activation at `hook`, each prompt run alone (no padding), by hand."""
    rows = []
    for p in probe:
        with record(m, [hook]) as rec:
            m(input_ids=torch.tensor([p]))
        acts = rec[hook][0].float()  # [s, d]
        rows.append(acts[-1:] if last else acts)
    return torch.cat(rows).mean(0)


def test_mean_activation_is_the_mean_over_real_positions():
    """Bug caught: padded positions counted in the mean (or a prompt's mean weighted like a
    token, or the first instead of the last token read for "last"), so the shift depends
    on how the probe is batched."""
    m = make_tiny("llama")
    for last in (False, True):
        want = hand_mean(m, PROBE, HOOK, last)
        got = mean_activation(m, PROBE, HOOK, "last" if last else "all", batch_size=2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_shift_of_base_plus_vector_is_that_vector():
    """Bug caught: the shift taken with the wrong sign (base - student), from the wrong
    hook, or the cosine/norm ratio computed against the wrong norm: a student that is the
    base model plus v at the hook has shift v, cosine 1 and |shift| / |v| = 1."""
    m = make_tiny("llama")
    v = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 3.0
    base = mean_activation(m, PROBE, HOOK)
    with steer(m, {HOOK: v}):
        shift = activation_shift(m, base, PROBE, HOOK)
    torch.testing.assert_close(shift, v, rtol=1e-4, atol=1e-4)
    figs = alignment_figures(shift, v)
    assert figs["cos_with_teacher_vector"] == pytest.approx(1.0, abs=1e-5)
    assert figs["shift_norm"] == pytest.approx(float(v.norm()), rel=1e-4)
    assert figs["shift_norm_ratio"] == pytest.approx(1.0, rel=1e-4)
    # against the opposite vector: cosine -1; against an orthogonal one: 0
    assert alignment_figures(shift, -v)["cos_with_teacher_vector"] == pytest.approx(-1, abs=1e-5)
    ortho = torch.zeros(64)
    ortho[0], ortho[1] = v[1], -v[0]
    assert alignment_figures(shift, ortho)["cos_with_teacher_vector"] == pytest.approx(
        0.0, abs=1e-5
    )


def test_logger_writes_the_columns_every_n_steps(steered_data, tmp_path):  # noqa: F811
    """Bug caught: the callback never reaching fit_lora's loop (no pass-through), writing
    on every step instead of every N, or measuring the base model instead of the LoRA
    student (then every cosine is 0 and the final one disagrees with a hand measurement
    of the finetuned model)."""
    m, v, exs = steered_data
    logger = AlignmentLogger(PROBE, HOOK, v, every=2)
    cfg = FitConfig(objective="distill", **{**QUICK, "lr": 0.01, "epochs": 2})
    res = fit_lora(
        m,
        exs,
        cfg,
        LoraConfig(r=4, alpha=8),
        teacher=teacher(v),
        out_dir=tmp_path,
        on_step=logger,
    )
    steps = [r["step"] for r in res.metrics]
    assert res.steps == len(steps) and res.steps % 2 == 0
    logged = [r["step"] for r in res.metrics if "cos_with_teacher_vector" in r]
    assert logged == [s for s in steps if s % 2 == 0]
    assert [h["step"] for h in logger.history] == logged
    # the last logged figures are those of the finetuned model, measured by hand
    base = hand_mean(m, PROBE, HOOK)
    with res.context():  # LoRA is injected into m for the block
        shift = hand_mean(m, PROBE, HOOK) - base
    want = float(shift @ v) / float(shift.norm() * v.norm())
    last = res.metrics[-1]
    assert last["cos_with_teacher_vector"] == pytest.approx(want, abs=1e-4)
    assert last["shift_norm"] == pytest.approx(float(shift.norm()), rel=1e-3)
    assert last["shift_norm_ratio"] == pytest.approx(float(shift.norm() / v.norm()), rel=1e-3)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["cos_with_teacher_vector"] != "" for r in rows] == [s % 2 == 0 for s in steps]


def test_perturbed_copy_changes_each_tensor_by_scale():
    """Bug caught: noise not scaled to each tensor's norm (a fixed std moves small tensors
    much more than scale), the original model modified in place, tied embeddings untied, or
    the seed ignored (controls not reproducible)."""
    m = make_tiny("llama")
    m.config.tie_word_embeddings = True
    m.tie_weights()
    before = {n: p.clone() for n, p in m.named_parameters()}
    lm = wrap_model(m, spec="tiny")
    a = perturbed_copy(lm, 0.05, seed=1)
    for n, p in a.model.named_parameters():
        rel = float((p - before[n]).norm() / before[n].norm())
        assert rel == pytest.approx(0.05, rel=1e-3), n
    for n, p in m.named_parameters():  # the original is untouched
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)
    assert a.model.lm_head.weight.data_ptr() == a.model.model.embed_tokens.weight.data_ptr()
    b = perturbed_copy(lm, 0.05, seed=1)
    c = perturbed_copy(lm, 0.05, seed=2)
    pa, pb, pc = (dict(x.model.named_parameters()) for x in (a, b, c))
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], rtol=0, atol=0)
    assert not torch.equal(
        pa["model.layers.0.mlp.up_proj.weight"], pc["model.layers.0.mlp.up_proj.weight"]
    )
    assert a.weights_hash != lm.weights_hash


def test_logger_follows_the_full_finetune_copy(steered_data):  # noqa: F811
    """Bug caught: fit_full not handing its trained copy to the logger (it would measure
    nothing, or the untouched original: shift 0), so the logged alignment of a full
    finetune disagrees with the finetuned model's own shift."""
    m, v, exs = steered_data
    logger = AlignmentLogger(PROBE, HOOK, v, every=3)
    cfg = FitConfig(objective="sft", optimizer="adamw", **{**QUICK, "lr": 1e-3})
    res = fit_full(m, exs, cfg, teacher=teacher(v), on_step=logger)
    assert [h["step"] for h in logger.history] == [s for s in range(1, res.steps + 1) if s % 3 == 0]
    final = logger.measure()  # the finished copy, measured by the logger
    shift = hand_mean(res.model, PROBE, HOOK) - hand_mean(m, PROBE, HOOK)
    assert float(shift.norm()) > 0.01  # the finetune moved the activations
    want = float(shift @ v) / float(shift.norm() * v.norm())
    assert final["cos_with_teacher_vector"] == pytest.approx(want, abs=1e-4)
    assert final["shift_norm"] == pytest.approx(float(shift.norm()), rel=1e-3)
