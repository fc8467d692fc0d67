"""steerdiff.fuzz (issue 16, started): noise of scale 0 is no hook at all, the noise has the
size and shape it claims, it is seeded, and its hooks go away after the block, also after an
exception."""

from __future__ import annotations

import pytest
import torch

from steerdiff.fuzz import FuzzError, noise
from steerdiff.hooks import record
from steerdiff.whiten import WhitenError, gaussian_from_activations

AT, NEXT = "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"  # NEXT reads AT's output


def n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def ids() -> torch.Tensor:
    return torch.randint(0, 100, (64, 32), generator=torch.Generator().manual_seed(0))


def test_scale_zero_is_exactly_no_hook_and_hooks_are_removed_even_after_an_error(tiny_lm):
    """Bugs caught: scale 0 still adding something (mutation: the `scale == 0` shortcut
    removed and the noise scaled by scale + 1e-4 -> logits differ), hooks left on the model
    after an exception (mutation: replace_activations' try/finally removed -> fails)."""
    m = tiny_lm.model
    x = ids()[:4]
    before = n_hooks(m)
    with torch.no_grad():
        clean = m(input_ids=x).logits
        with noise(m, [AT], scale=0.0):
            same = m(input_ids=x).logits
        assert torch.equal(clean, same)
        with noise(m, [AT], scale=1.0):
            assert not torch.equal(m(input_ids=x).logits, clean)
    assert n_hooks(m) == before
    with pytest.raises(RuntimeError, match="boom"), noise(m, [AT], scale=1.0):
        raise RuntimeError("boom")
    assert n_hooks(m) == before


def test_isotropic_noise_has_the_relative_size_it_claims_and_is_seeded(tiny_lm):
    """Bug caught: noise not scaled by each token's RMS (mutation: `rms` replaced by 1 ->
    the ratio is far from 1), or unseeded (two runs with one seed differ)."""
    m, x = tiny_lm.model, ids()
    with torch.no_grad(), record(m, NEXT) as r0:
        m(input_ids=x)
    h = r0[NEXT].double()
    runs = []
    for _ in range(2):
        with torch.no_grad(), noise(m, [AT], scale=0.3, seed=7), record(m, NEXT) as r1:
            m(input_ids=x)
        runs.append(r1[NEXT].double())
    assert torch.equal(runs[0], runs[1])
    want = 0.3**2 * (h.norm(dim=-1) ** 2 / h.shape[-1]).mean()
    got = ((runs[0] - h) ** 2).mean()
    assert float(got / want) == pytest.approx(1.0, abs=0.05)
    with torch.no_grad(), noise(m, [AT], scale=0.3, seed=8), record(m, NEXT) as r2:
        m(input_ids=x)
    assert not torch.equal(r2[NEXT], runs[0].float())


def test_whitened_noise_has_the_covariance_of_the_data(tiny_lm):
    """noise ~ N(0, scale^2 cov): its empirical covariance over 2048 positions is close to
    scale^2 cov. Bug caught: the Cholesky factor applied untransposed (mutation: `z @ chol`
    -> fails)."""
    m, x = tiny_lm.model, ids()
    d = m.config.hidden_size
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    data = torch.randn(4000, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    g = gaussian_from_activations(data @ a.T, AT, shrinkage="none")
    with torch.no_grad(), record(m, NEXT) as r0:
        m(input_ids=x)
    with torch.no_grad(), noise(m, [AT], scale=0.5, gaussians={AT: g}), record(m, NEXT) as r1:
        m(input_ids=x)
    eps = (r1[NEXT] - r0[NEXT]).double().reshape(-1, d)
    emp = eps.T @ eps / eps.shape[0]
    want = 0.25 * g.cov
    assert float((emp - want).norm() / want.norm()) < 0.15


def test_bad_settings_are_one_line(tiny_lm):
    """Bugs caught: a negative or NaN scale accepted (mutation: the check removed -> no
    error), a Gaussian of another hook used silently."""
    for bad in (-1.0, float("nan")):
        with pytest.raises(FuzzError, match="scale must be a finite number >= 0"):
            with noise(tiny_lm.model, [AT], scale=bad):
                pass
    g = gaussian_from_activations(torch.randn(200, 64, dtype=torch.float64), NEXT)
    with pytest.raises(WhitenError, match=f"fitted at {NEXT}: fit one at {AT}"):
        with noise(tiny_lm.model, [AT], scale=1.0, gaussians={AT: g}):
            pass
    with pytest.raises(FuzzError, match="needs a Gaussian fitted there"):
        with noise(tiny_lm.model, [AT], scale=1.0, gaussians={}):
            pass
