"""LoRA / full finetune baselines and kl_between."""

from __future__ import annotations

import pytest
import torch
from test_train import HOOK, QUICK, steered_data, teacher  # noqa: F401  (fixture)

from steerdiff.fit import (
    FitConfig,
    LoraConfig,
    base_context,
    fit_full,
    fit_lora,
    kl_between,
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
    assert res.fitted_val_loss < res.base_val_loss and res.gap_closed > 0
    assert res.metrics[-1]["train_loss"] < res.metrics[0]["train_loss"]
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
    assert res.metrics[-1]["train_loss"] < res.metrics[0]["train_loss"]
    torch.testing.assert_close(logits(m), before)
    with res.context() as tuned:
        assert not torch.allclose(logits(tuned), before)
        want = logits(tuned)
    # the out folder is one an adapter teacher loads, and it is the same finetune
    loaded = load_adapted(tmp_path, wrap_model(m))
    torch.testing.assert_close(logits(loaded.model), want)


def test_kl_between(steered_data):  # noqa: F811
    m, v, exs = steered_data
    same = kl_between(lambda: base_context(m), lambda: base_context(m), TEXTS)
    assert same == pytest.approx(0.0, abs=1e-6)
    steered = vector_context(m, {HOOK: v})
    kl = kl_between(lambda: base_context(m), steered, TEXTS)
    half = kl_between(lambda: base_context(m), vector_context(m, {HOOK: v}, 0.5), TEXTS)
    assert 0 < half < kl
    # the same number by hand
    ids = [torch.tensor(t) for t in TEXTS]
    tot, n = 0.0, 0
    for x in ids:
        la = torch.log_softmax(m(input_ids=x[None]).logits[0], -1)
        with steered() as sm:
            lb = torch.log_softmax(sm(input_ids=x[None]).logits[0], -1)
        tot += float((la.exp() * (la - lb)).sum())
        n += len(x)
    assert kl == pytest.approx(tot / n, rel=1e-4)
