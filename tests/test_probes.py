"""Generalisation probes: the estimators against closed forms and Monte Carlo, in float64."""

import math

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqicl
from analysis import _probes as P, probes as probes_cli

F64 = jnp.float64
D, N = 10, 20


def test_estimate_reports_the_tail():
    v = np.concatenate([np.ones(1999), [2001.0]])
    est = P.estimate(v)
    assert est["sequences"] == 2000 and est["nonfinite"] == 0
    np.testing.assert_allclose(est["mean"], 2.0, rtol=1e-15)
    np.testing.assert_allclose(est["se"], v.std(ddof=1) / math.sqrt(2000), rtol=1e-14)
    assert est["max"] == 2001.0 and est["median"] == 1.0
    # top 0.1 % of 2000 sequences = the 2 largest: 2001 + 1 of a sum of 4000
    np.testing.assert_allclose(est["top_share"], 2002.0 / 4000.0, rtol=1e-15)
    bad = P.estimate([1.0, np.inf, 2.0])
    assert bad["mean"] == math.inf and bad["nonfinite"] == 1


def test_anisotropic_covariance_has_the_asked_spectrum():
    for kappa in (1.0, 10.0, 100.0):
        r = P.anisotropic_root(D, kappa, jr.key(3))
        ev = np.linalg.eigvalsh(np.asarray(r @ r.T))
        np.testing.assert_allclose(ev.sum(), D, rtol=1e-13)
        np.testing.assert_allclose(ev.max() / ev.min(), kappa, rtol=1e-11)
        want = np.geomspace(1.0, 1.0 / kappa, D)
        np.testing.assert_allclose(np.sort(ev), np.sort(want * D / want.sum()), rtol=1e-11)


def _batch(kappa=10.0, law="gaussian", size=4000, seed=0, n=N):
    root = P.anisotropic_root(D, kappa, jr.key(99)) if kappa != 1 else None
    sigma = jr.uniform(jr.key(seed + 1), (size,), F64, 0.0, 3.0)
    b = P.sample_probe(jr.key(seed), D, n, sigma, root, law)
    cov = root @ root.T if root is not None else jnp.eye(D, dtype=F64)
    return b, cov


def _some_estimator(sp):
    """Weights that are not the oracle's (ridge with a wrong λ), in eigen-coordinates."""
    return sp.a / (sp.e + 0.3 * sp.sigma[:, None] ** 2 + 2.0)


def test_exact_scorer_is_the_weighted_quadratic():
    """κ = 1: exactly eqicl.exact_loss; κ = 10: ½(w − μ)ᵀΣ_x(w − μ) in the original
    coordinates with μ from numpy.linalg.solve."""
    b, cov = _batch(kappa=1.0, size=50)
    s = P.make_scorer(b, cov, exact=True)
    c = _some_estimator(s.sp)
    np.testing.assert_allclose(s(c), eqicl.exact_loss(s.sp, c), rtol=1e-12, atol=1e-15)
    b, cov = _batch(kappa=10.0, size=50)
    s = P.make_scorer(b, cov, exact=True)
    c = _some_estimator(s.sp)
    w = np.einsum("bij,bj->bi", np.asarray(s.sp.v), np.asarray(c))
    x, y, sig = np.asarray(b.x), np.asarray(b.y), np.asarray(b.sigma)
    for i in range(50):
        mu = np.linalg.solve(x[i].T @ x[i] + sig[i] ** 2 * np.eye(D), x[i].T @ y[i])
        want = 0.5 * (w[i] - mu) @ np.asarray(cov) @ (w[i] - mu)
        np.testing.assert_allclose(float(s(c)[i]), want, rtol=1e-10)


def test_exact_estimator_matches_the_sampled_loss_with_anisotropic_queries():
    """E[½(ŷ − y_t)² − ½(ŷ_oracle − y_t)²] with x_t ~ N(0, Σ_x) equals the weighted exact
    loss (which also says μ = (Σ + σ²I)⁻¹α is still the posterior mean, w ~ N(0, I)); the
    unweighted ½‖w − μ‖² is many standard errors away."""
    b, cov = _batch(kappa=30.0, size=40_000, seed=4)
    s = P.make_scorer(b, cov, exact=True)
    c = _some_estimator(s.sp)
    sampled = np.asarray(eqicl.sampled_loss(s.sp, c))
    diff = sampled - np.asarray(s(c))
    se = diff.std(ddof=1) / math.sqrt(diff.size)
    assert abs(diff.mean()) < 4 * se
    wrong = sampled - np.asarray(eqicl.exact_loss(s.sp, c))
    assert abs(wrong.mean()) > 10 * wrong.std(ddof=1) / math.sqrt(wrong.size)


@pytest.mark.parametrize("law", ["laplace", "student3", "uniform"])
def test_noise_laws_have_unit_variance(law):
    xi = P._unit_noise(jr.key(5), (400_000,), law, F64)
    sq = np.asarray(xi) ** 2
    assert abs(sq.mean() - 1.0) < 5 * sq.std(ddof=1) / math.sqrt(sq.size)
    assert abs(float(np.mean(np.asarray(xi)))) < 0.01


def test_excess_estimator():
    """½(w − w_τ)ᵀΣ_x(w − w_τ) − ½(μ − w_τ)ᵀΣ_x(μ − w_τ), term by term; under Gaussian noise
    its mean agrees with the exact estimator's; under Laplace noise with the sampled
    excess over ridge λ = σ² (the query integrated out)."""
    b, cov = _batch(kappa=10.0, law="laplace", size=30_000, seed=6)
    s = P.make_scorer(b, cov, exact=False)
    c = _some_estimator(s.sp)
    v = np.asarray(s.sp.v)
    w = np.einsum("bij,bj->bi", v, np.asarray(c))
    mu = np.einsum("bij,bj->bi", v, np.asarray(s.sp.oracle))
    wt, cv = np.asarray(b.w), np.asarray(cov)
    want = 0.5 * np.einsum("bi,ij,bj->b", w - wt, cv, w - wt)
    want -= 0.5 * np.einsum("bi,ij,bj->b", mu - wt, cv, mu - wt)
    np.testing.assert_allclose(np.asarray(s(c)), want, rtol=1e-9, atol=1e-12)
    diff = np.asarray(eqicl.sampled_loss(s.sp, c)) - np.asarray(s(c))
    assert abs(diff.mean()) < 4 * diff.std(ddof=1) / math.sqrt(diff.size)
    g, cov = _batch(kappa=10.0, size=30_000, seed=7)
    ex, ap = P.make_scorer(g, cov, exact=True), P.make_scorer(g, cov, exact=False)
    c = _some_estimator(ex.sp)
    diff = np.asarray(ap(c)) - np.asarray(ex(c))
    assert abs(diff.mean()) < 4 * diff.std(ddof=1) / math.sqrt(diff.size)


def test_run_probe_scores_a_hand_set_model_like_its_baseline():
    """A one-layer GD++ model w = ηα and the GD baseline with the same η are the same weights:
    their estimates agree to round-off, on every probe family; ConstRR retuned at a fixed σ
    finds λ ≈ σ² (the oracle)."""
    eta = 0.02
    model = eqicl.gdpp_transformer([[0.0, -eta]], D)
    task = eqicl.TaskConfig(noise="uniform", sigma_max=2.0)
    tuned = eqicl.TunedBaselines(
        const_lambda=1.0, tuned_c=1.0, tuned_max=math.inf, gd_steps=1, gd_eta=eta
    )
    for probe in (
        P.Probe("kappa", 10, N, kappa=10.0),
        P.Probe("law", "laplace", N, law="laplace"),
        P.Probe("sigma", 1.5, N, sigma=1.5),
    ):
        out = P.run_probe(
            model, task, tuned, probe, jr.key(8), sequences=2000, tune_sequences=1000, chunk=1000
        )
        m, g = out["methods"]["model"], out["methods"]["gd1"]
        for k in ("mean", "max", "median"):
            np.testing.assert_allclose(m[k], g[k], rtol=1e-10)
        assert m["sequences"] == 2000
    np.testing.assert_allclose(out["retuned"]["const_lambda"], 1.5**2, rtol=0.05)


def test_weights_names_give_the_training_task():
    t = probes_cli.task_from_name("diag-L5-u5")
    assert (t.noise, t.sigma_max) == ("uniform", 5.0)
    t = probes_cli.task_from_name("full-L4-c1_3_5")
    assert (t.noise, t.sigma_set) == ("categorical", (1.0, 3.0, 5.0))
    assert probes_cli.task_from_name("model") is None
