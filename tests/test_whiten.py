"""steerdiff.whiten (issue 16, started): the Gaussian of a hook's activations and the
Mahalanobis norm, checked against direct computations; invariance to an invertible linear
map of the data; fitting on a model; save/load; one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _pipeline_tiny import save_tiny
from sklearn.covariance import LedoitWolf

from steerdiff.chat import encode
from steerdiff.hooks import record
from steerdiff.models import load_model, wrap_model
from steerdiff.whiten import (
    Gaussian,
    WhitenError,
    check_for,
    fit_gaussian,
    gaussian_from_activations,
    whitened_coeff,
)

D = 8


def data(n: int = 400, seed: int = 0) -> torch.Tensor:
    """Correlated activations [n, D] with a nonzero mean."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(D, D, generator=g)
    return torch.randn(n, D, generator=g, dtype=torch.float64) @ mix.double() + 3.0


def test_mahalanobis_norm_and_distance_equal_a_direct_computation():
    """Bugs caught: the norm not using the inverse covariance (mutation: `_solve` returns v ->
    fails), the mean not subtracted in `distance` (mutation -> fails), and whitened_coeff not
    inverting the norm."""
    x = data()
    g = gaussian_from_activations(x, "h", shrinkage="none")
    xn = x.numpy()
    cov = np.cov(xn.T, bias=True)
    prec = np.linalg.inv(cov)
    v = torch.randn(D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = float(np.sqrt(v.numpy() @ prec @ v.numpy()))
    assert float(g.mahalanobis_norm(v)) == pytest.approx(want, rel=1e-9)
    pts = x[:5]
    direct = np.sqrt(np.einsum("nd,de,ne->n", xn[:5] - xn.mean(0), prec, xn[:5] - xn.mean(0)))
    np.testing.assert_allclose(g.distance(pts).numpy(), direct, rtol=1e-9)
    k = whitened_coeff(g, v, 2.5)
    assert float(g.mahalanobis_norm(k * v)) == pytest.approx(2.5, rel=1e-9)
    # bug caught: a zero vector escaping as ZeroDivisionError (mutation: the check removed)
    with pytest.raises(WhitenError, match="all zeros"):
        whitened_coeff(g, torch.zeros(D), 1.0)
    # the data's standard deviation along v
    u = v / v.norm()
    assert g.spread(v) == pytest.approx(float(((x - x.mean(0)) @ u).std(unbiased=False)), rel=1e-9)


def test_mahalanobis_norm_is_invariant_to_an_invertible_linear_map_of_the_data():
    """Measured in whitened units, v on data x and A v on data A x are the same size.
    Bug caught: a norm that is not the data's own metric (mutation: `_solve` returns v, the
    Euclidean norm -> fails)."""
    x = data()
    a = torch.randn(D, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a = a + 3 * torch.eye(D, dtype=torch.float64)  # well-conditioned, invertible
    g1 = gaussian_from_activations(x, "h", shrinkage="none")
    g2 = gaussian_from_activations(x @ a.T, "h", shrinkage="none")
    v = torch.randn(D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert float(g2.mahalanobis_norm(a @ v)) == pytest.approx(
        float(g1.mahalanobis_norm(v)), rel=1e-8
    )
    np.testing.assert_allclose(
        g2.distance(x[:4] @ a.T).numpy(), g1.distance(x[:4]).numpy(), rtol=1e-8
    )


def test_ledoit_wolf_equals_scikit_learn_and_rescues_a_singular_covariance():
    """Bugs caught: the shrinkage not applied (mutation: the LW branch keeps the empirical
    covariance -> differs from scikit-learn's), a singular covariance escaping as a torch
    error instead of one line, and a fixed weight outside [0, 1] accepted."""
    x = data(n=300)
    g = gaussian_from_activations(x, "h")  # default: Ledoit-Wolf
    lw = LedoitWolf().fit(x.numpy())
    np.testing.assert_allclose(g.cov.numpy(), lw.covariance_, rtol=1e-10)
    assert g.shrinkage == pytest.approx(lw.shrinkage_)
    few = data(n=5)  # 5 tokens in 8 dimensions: the empirical covariance is singular
    with pytest.raises(WhitenError, match=r"singular \(5 tokens for 8 dimensions\)"):
        gaussian_from_activations(few, "blocks.3.hook_resid_post", shrinkage="none")
    assert gaussian_from_activations(few, "h").shrinkage > 0
    with pytest.raises(WhitenError, match=r"weight must be in \[0, 1\]"):
        gaussian_from_activations(x, "h", shrinkage=1.5)


@pytest.fixture(scope="module")
def tiny_smollm(tmp_path_factory, smollm):
    """A 2-layer SmolLM2-shaped model with SmolLM2's tokenizer, loaded from a folder."""
    folder = save_tiny(tmp_path_factory.mktemp("models") / "tiny2", smollm, "llama", 2)
    return load_model(str(folder), dtype="float32")


def test_fit_on_a_model_saves_loads_and_refuses_another_hook_or_model(tmp_path, tiny_smollm):
    """fit_gaussian's mean is the mean of the recorded activations without each text's first
    token (mutation: skip_first ignored -> the means differ); save/load round-trips; another
    hook, another model (weights hash), a vector of another width and a corrupt file are each
    one line."""
    hook = "blocks.1.hook_resid_post"
    texts = ["the owl sat on the branch at night", "numbers: 12, 45, 78, 90, 31", "hello there"]
    lm = tiny_smollm
    g = fit_gaussian(lm, hook, texts, shrinkage=0.1)
    acts = []
    for t in texts:
        ids = encode(lm.tokenizer, t)
        with record(lm.model, hook) as rec:
            lm.model(input_ids=torch.tensor([ids]))
        acts.append(rec[hook][0, 1:].double())
    torch.testing.assert_close(g.mean, torch.cat(acts).mean(0), rtol=1e-6, atol=1e-6)
    path = g.save(tmp_path / "g.safetensors")
    back = Gaussian.load(path)
    torch.testing.assert_close(back.cov, g.cov)
    assert (back.hook, back.meta["weights_hash"], back.shrinkage) == (hook, lm.weights_hash, 0.1)
    check_for(back, lm, hook)  # the same hook and model: no error
    for bad_hook, model, match in (
        ("blocks.0.hook_resid_post", lm, "fitted at blocks.1.hook_resid_post, not blocks.0"),
        (hook, wrap_model(lm.model, spec="other", weights_hash="bbbb"), "not on this one"),
    ):
        with pytest.raises(WhitenError, match=match) as e:
            check_for(back, model, bad_hook)
        assert "\n" not in str(e.value)
    with pytest.raises(WhitenError, match="width 3 cannot be measured"):
        back.mahalanobis_norm(torch.ones(3))
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(WhitenError, match="not a steerdiff Gaussian or is corrupt"):
        Gaussian.load(tmp_path / "bad.safetensors")
