"""LoRA / full finetune baselines and kl_between."""

from __future__ import annotations

import pytest
import torch
from test_train import HOOK, QUICK, hand_ce, steered_data, teacher  # noqa: F401  (fixture)

from steerdiff.fit import (
    FitConfig,
    LoraConfig,
    base_context,
    fit_full,
    fit_lora,
    kl_between,
    split_examples,
    vector_context,
)
from steerdiff.models import wrap_model
from steerdiff.teachers import load_adapted

torch.set_num_threads(1)
TEXTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [100, 3, 7, 9, 200]]


def logits(m: torch.nn.Module) -> torch.Tensor:
    return m(input_ids=torch.tensor([[5, 6, 7, 8]])).logits


def test_lora_fits_and_leaves_base_untouched(steered_data, tmp_path):  # noqa: F811
    m, v, exs = steered_data
    before = logits(m)
    cfg = FitConfig(objective="distill", **{**QUICK, "lr": 0.01, "epochs": 2})
    res = fit_lora(m, exs, cfg, LoraConfig(r=4, alpha=8), teacher=teacher(v), out_dir=tmp_path)
    # the reported figures are those of the finetune, computed by hand on the held-out rows
    train, val = split_examples(list(exs), cfg)
    with res.context() as tuned:
        fitted = hand_ce(tuned, val)[0]
        after = hand_ce(tuned, train)[0]
    base, teach = hand_ce(m, val)[0], hand_ce(m, val, {HOOK: v})[0]
    assert res.fitted_val_loss == pytest.approx(fitted, rel=1e-4)
    assert res.gap_closed == pytest.approx((base - fitted) / (base - teach), rel=1e-3)
    assert after < hand_ce(m, train)[0] - 0.01  # two epochs lower the loss on their rows
    # r=4 on q,k,v,o,gate,up,down of 3 layers: A [r, in] + B [out, r] each
    per_layer = 4 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert res.extra["n_trainable"] == 3 * per_layer
    torch.testing.assert_close(logits(m), before)  # base model restored
    assert not any("lora" in n for n, _ in m.named_modules())
    with res.context() as tuned:
        assert not torch.allclose(logits(tuned), before)
    torch.testing.assert_close(logits(m), before)
    assert (tmp_path / "adapter.safetensors").exists() and (tmp_path / "metrics.csv").exists()
    # the out folder is one an adapter teacher loads, and it is the same finetune
    with res.context() as tuned:
        want = logits(tuned)
    loaded = load_adapted(tmp_path, wrap_model(m))
    torch.testing.assert_close(logits(loaded.model), want)


def test_full_finetune_copies_the_model(steered_data, tmp_path):  # noqa: F811
    m, v, exs = steered_data
    before = logits(m)
    cfg = FitConfig(objective="sft", optimizer="adamw", **{**QUICK, "lr": 1e-3})
    res = fit_full(m, exs, cfg, teacher=teacher(v), out_dir=tmp_path)
    assert res.extra["n_trainable"] == sum(p.numel() for p in m.parameters())
    # one epoch lowers the loss on the rows it trained on (for any draw of the data; the
    # last batch's loss against the first's depends on which rows they hold)
    train, val = split_examples(list(exs), cfg)
    assert hand_ce(res.model, train)[0] < hand_ce(m, train)[0] - 0.01
    assert res.fitted_val_loss == pytest.approx(hand_ce(res.model, val)[0], rel=1e-4)
    torch.testing.assert_close(logits(m), before)
    with res.context() as tuned:
        assert not torch.allclose(logits(tuned), before)
        want = logits(tuned)
    # the out folder is one an adapter teacher loads, and it is the same finetune
    loaded = load_adapted(tmp_path, wrap_model(m))
    torch.testing.assert_close(logits(loaded.model), want)


def test_kl_between(steered_data):  # noqa: F811
    """kl_between equals the mean per real token of KL(base || steered) computed by hand,
    at coefficient 1 and 0.5 (bug caught: a context's coeff ignored, padding counted)."""
    m, v, exs = steered_data
    same = kl_between(lambda: base_context(m), lambda: base_context(m), TEXTS)
    assert same == pytest.approx(0.0, abs=1e-6)

    def by_hand(coeff: float) -> float:
        tot, n = 0.0, 0
        for x in (torch.tensor(t) for t in TEXTS):
            la = torch.log_softmax(m(input_ids=x[None]).logits[0], -1)
            with vector_context(m, {HOOK: v}, coeff)() as sm:
                lb = torch.log_softmax(sm(input_ids=x[None]).logits[0], -1)
            tot += float((la.exp() * (la - lb)).sum())
            n += len(x)
        return tot / n

    kl = kl_between(lambda: base_context(m), vector_context(m, {HOOK: v}), TEXTS)
    half = kl_between(lambda: base_context(m), vector_context(m, {HOOK: v}, 0.5), TEXTS)
    assert kl == pytest.approx(by_hand(1.0), rel=1e-4)
    assert half == pytest.approx(by_hand(0.5), rel=1e-4)
    assert half < kl  # half the vector moves the model less
