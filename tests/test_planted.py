"""Ground truth: a planted vector v* is recovered by fitting at its hook on the teacher's samples."""

from __future__ import annotations

import pytest
import torch
from test_train import HOOK, peaky_tiny

from steerdiff.fit import FitConfig, planted_experiment, random_vector, sample_examples

torch.set_num_threads(1)


def test_planted_vector_is_recovered_by_distillation():
    """Ground truth: distillation on the teacher's top-k recovers v* (docs/fit.md: cosine
    1.000 and norm ratio 1.000 from 100 samples), so the fit closes the whole gap."""
    m = peaky_tiny()
    v_star = random_vector(m, HOOK, 4.0, seed=3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 256, (6,), generator=g).tolist() for _ in range(300)]
    # top-k distillation in absolute lr units for all 10 epochs, pinned (issue 18 made the
    # defaults online distillation, lr in activation units and a convergence stop)
    cfg = FitConfig(
        objective="distill",
        lr=0.05,
        lr_units="absolute",
        converge_tol=None,
        epochs=10,
        batch_size=32,
        progress=False,
    )
    res = planted_experiment(m, HOOK, v_star, prompts, cfg, max_new_tokens=8, topk=32)
    assert res.n_samples == 300 and res.objective == "distill"
    assert res.cosine == pytest.approx(1.0, abs=0.005)
    assert res.norm_ratio == pytest.approx(1.0, abs=0.02)
    assert res.fit.fitted_val_loss == pytest.approx(res.fit.teacher_val_loss, abs=1e-3)
    assert res.fit.gap_closed == pytest.approx(1.0, abs=0.1)
    assert res.fit.metrics[-1]["val_kl"] < 1e-3 * res.fit.metrics[0]["train_kl"]


def test_sample_examples_greedy_equals_model_generate():
    """sample_examples uses generate.sample: greedy (temperature 0) is HF's greedy decode,
    with and without the planted vector, and the completion keeps eos_id."""
    from steerdiff.hooks import steer

    m = peaky_tiny()
    v = random_vector(m, HOOK, 16.0, seed=3)
    eos = int(m.config.eos_token_id)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [100, 3]]
    for vectors in (None, {HOOK: v}):
        exs = sample_examples(m, prompts, vectors, max_new_tokens=8, temperature=0.0, eos_id=eos)
        for p, ex in zip(prompts, exs, strict=True):
            with steer(m, vectors or {}):
                ref = m.generate(
                    torch.tensor([p]),
                    do_sample=False,
                    max_new_tokens=8,
                    eos_token_id=eos,
                    pad_token_id=0,
                )[0, len(p) :].tolist()
            assert ex.prompt_ids == p and ex.completion_ids == ref
