"""The Theorem 5.1 and 5.2 constructions against their closed forms, in float64."""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqicl

F64 = jnp.float64
D, N = 10, 20

_tokens = eqx.filter_jit(lambda model, x, y, xq: model.tokens(x, y, xq))


def _context(seed, sigma=0.0, d=D, n=N, scale=1.0):
    task = eqicl.TaskConfig(d=d, n=n, noise="fixed", sigma=sigma)
    b = eqicl.sample_batch(jr.key(seed), task, 1, F64)
    x = scale * b.x[0]
    y = x @ b.w[0] + (b.y[0] - b.x[0] @ b.w[0])
    return x, y, b.xq, b.w[0]


def _stats(x, y):
    x, y = np.asarray(x), np.asarray(y)
    return x.T @ x, x.T @ y, float(y @ y)


def test_one_head_models_hold_the_coefficients_asked():
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(3, 2)), rng.normal(size=(3, 2))
    coef = np.stack([np.outer(pi, qi).ravel() for pi, qi in zip(p, q, strict=True)])
    model = eqicl.diag_transformer(coef, D)
    np.testing.assert_allclose(model.coefficients(), coef, rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match="one head"):
        eqicl.diag_transformer([[1.0, 0.0, 0.0, 1.0]], D)
    gd = np.array([[-0.01, 0.0], [0.0, -0.05]])
    got = eqicl.gdpp_transformer(gd, D).coefficients()
    np.testing.assert_array_equal(got, [[-0.01, 0.0, 0.0, 0.0], [0.0, 0.0, -0.05, 0.0]])


def test_theorem51_constants_follow_the_bound():
    """γ_l = 1/(3Λ_l), Λ_{l+1} = (4/9)Λ_l, η = 1/Λ_K: the top of e(1 − γ_l e)² on [0, Λ_l]."""
    c = eqicl.theorem51(90.0, 4)
    np.testing.assert_allclose(c.bounds, 90.0 * (4 / 9) ** np.arange(5), rtol=1e-15)
    e = np.linspace(0, c.bounds[0], 100_001)
    top = np.max(e * (1 - c.gammas[0] * e) ** 2)
    np.testing.assert_allclose(top, c.bounds[1], rtol=1e-12)
    assert c.eta == 1.0 / c.bounds[-1]
    coef = eqicl.theorem51_transformer(90.0, 4, D).coefficients()
    np.testing.assert_array_equal(coef[:4, 0], -c.gammas)
    np.testing.assert_array_equal(coef[:4, 1:], 0.0)
    np.testing.assert_array_equal(coef[4], [0.0, 0.0, -c.eta, 0.0])


@pytest.mark.parametrize("steps", [0, 1, 3, 7])
def test_theorem51_weights_are_the_matrix_polynomial(steps):
    """The forward pass's w^K equals η M_K² α with M_K = Π (I − γ_l Σ_l) (matrix products),
    and OLS shrunk by g^K(e_i/Λ₀) along each eigenvector (the eigen form)."""
    x, y, _, _ = _context(steps, sigma=0.3)
    sig, alpha, _ = _stats(x, y)
    model = eqicl.theorem51_transformer(60.0, steps, D)
    w = np.asarray(model.implicit_weights(x, y)[-1])
    poly = eqicl.theorem51_weights(sig, alpha, 60.0, steps)
    np.testing.assert_allclose(w, poly, rtol=1e-12, atol=1e-14)
    e, v = np.linalg.eigh(sig)
    eigen = v @ (eqicl.theorem51_shrinkage(e, 60.0, steps) * (v.T @ alpha) / e)
    np.testing.assert_allclose(w, eigen, rtol=1e-11, atol=1e-13)
    if steps == 0:  # one GD step of size 1/Λ₀ from 0
        np.testing.assert_allclose(w, alpha / 60.0, rtol=1e-14)


def test_theorem51_statistics_follow_the_map():
    """After K preconditioning layers the context's Σ^K has eigenvalues Λ_K g^K(e/Λ₀), and
    the query token is M_K x_t (the y coordinates untouched until the last layer)."""
    x, y, xq, _ = _context(11)
    sig, _, _ = _stats(x, y)
    steps, cover = 5, 70.0
    model = eqicl.theorem51_transformer(cover, steps, D)
    tokens = np.asarray(_tokens(model, x, y, xq))
    ctx = tokens[steps, :N]
    np.testing.assert_allclose(ctx[:, -1], y, rtol=1e-14)
    got = np.linalg.eigvalsh(ctx[:, :D].T @ ctx[:, :D])
    e = np.linalg.eigvalsh(sig)
    want = eqicl.theorem51(cover, steps).bounds[-1] * eqicl.theorem51_shrinkage(e, cover, steps)
    np.testing.assert_allclose(np.sort(got), np.sort(want), rtol=1e-11)


def test_theorem51_rate_is_second_order():
    """1 − g(1 − δ) = (3/4)δ² + δ³/4 (the second-order rate), and a covered sequence's error
    after K steps is at most ½ (1 − g^K(λ_min/Λ₀))² ‖w_OLS‖²."""
    delta = np.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(
        1 - eqicl.theorem51_map(1 - delta), 0.75 * delta**2 + 0.25 * delta**3, atol=1e-15
    )
    x, y, _, w = _context(3)
    sig, alpha, _ = _stats(x, y)
    w = np.asarray(w)
    e = np.linalg.eigvalsh(sig)
    cover = 1.01 * e[-1]
    # The matrix polynomial (equal to the forward pass: the test above) keeps this fast.
    for steps in range(13):
        err = 0.5 * np.sum((eqicl.theorem51_weights(sig, alpha, cover, steps) - w) ** 2)
        tau = eqicl.theorem51_shrinkage(e[0], cover, steps)
        assert err <= 0.5 * (1 - tau) ** 2 * float(np.sum(w**2)) * (1 + 1e-9) + 1e-26
    assert err < 1e-24


def test_theorem51_diverges_beyond_five_times_the_bound():
    """g(5) = 5 is the unstable fixed point: a spectrum above 5Λ₀ grows like τ^(3^K)."""
    np.testing.assert_allclose(eqicl.theorem51_map(5.0), 5.0, rtol=1e-15)
    x, y, _, _ = _context(5, scale=1.0)
    sig, alpha, _ = _stats(x, y)
    e = np.linalg.eigvalsh(sig)
    cover = e[-1] / 5.5
    shrink = [eqicl.theorem51_shrinkage(e[-1], cover, k) for k in range(4)]
    assert all(b > 3 * a for a, b in zip(shrink[1:], shrink[2:], strict=False))
    w = np.asarray(eqicl.theorem51_transformer(cover, 3, D).implicit_weights(x, y)[-1])
    np.testing.assert_allclose(w, eqicl.theorem51_weights(sig, alpha, cover, 3), rtol=1e-10)


def test_wishart_moments():
    """d = 1: Σ ~ χ²_n, moments n, n(n + 2), n(n + 2)(n + 4); any d: a Monte Carlo check."""
    for n in (1, 5, 20):
        assert eqicl.wishart_trace_moments(n, 1) == (n, n * (n + 2), n * (n + 2) * (n + 4))
    x = jr.normal(jr.key(0), (40_000, 12, 4), F64)
    s = jnp.einsum("bni,bnj->bij", x, x)
    traces = [jnp.trace(s, axis1=1, axis2=2), jnp.trace(s @ s, axis1=1, axis2=2)]
    traces.append(jnp.trace(s @ s @ s, axis1=1, axis2=2))
    for got, want in zip(traces, eqicl.wishart_trace_moments(12, 4), strict=True):
        se = float(jnp.std(got) / jnp.sqrt(got.size))
        assert abs(float(jnp.mean(got)) - want) < 4 * se


def test_theorem52_constants_match_ridge_at_both_levels():
    """E[η(1 + ω λ¹) | σ_k] = 1/(n + σ_k²) at both levels, with E[λ¹ | σ] = A + Bσ²."""
    for n, s1, s2 in ((40, 1.0, 3.0), (200, 0.5, 2.0), (80, 2.0, 6.0)):
        c = eqicl.theorem52(n, D, s1, s2)
        a, b = eqicl.residual_moments(n, D, c.eta)
        for s in (s1, s2):
            np.testing.assert_allclose(
                c.eta * (1 + c.omega * (a + b * s**2)), 1 / (n + s**2), rtol=1e-10
            )
    with pytest.raises(ValueError, match="no two-layer construction"):
        eqicl.theorem52(20, D, 1.0, 3.0)


def test_residual_moments_monte_carlo():
    n, d, eta, sigma = 15, 3, 0.05, 1.7
    task = eqicl.TaskConfig(d=d, n=n, noise="fixed", sigma=sigma)
    b = eqicl.sample_batch(jr.key(2), task, 40_000, F64)
    r = b.y - eta * jnp.einsum("bni,bi->bn", b.x, jnp.einsum("bni,bn->bi", b.x, b.y))
    lam1 = jnp.sum(r**2, axis=-1)
    a, bb = eqicl.residual_moments(n, d, eta)
    se = float(jnp.std(lam1) / jnp.sqrt(lam1.size))
    assert abs(float(jnp.mean(lam1)) - (a + bb * sigma**2)) < 4 * se


def test_theorem52_model_is_its_closed_form():
    """Layer 1 only w_yx, layer 2 only w_yy; w² = η(1 + ωλ¹)α with λ¹ from Σ, α, λ."""
    c = eqicl.theorem52(40, D, 1.0, 3.0)
    model = eqicl.theorem52_transformer(40, D, 1.0, 3.0)
    coef = np.asarray(model.coefficients())
    np.testing.assert_array_equal(coef[0, [0, 1, 3]], 0.0)
    np.testing.assert_array_equal(coef[1, :3], 0.0)
    np.testing.assert_allclose(coef[:, [2, 3]].diagonal(), [-c.eta, c.omega], rtol=1e-14)
    for seed in range(3):
        x, y, _, _ = _context(seed, sigma=3.0, n=40)
        sig, alpha, lam = _stats(x, y)
        w = np.asarray(model.implicit_weights(x, y)[-1])
        want = eqicl.theorem52_weights(sig, alpha, lam, c.eta, c.omega)
        np.testing.assert_allclose(w, want, rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_theorem_measurements_run_small():
    """The analysis functions on a few sequences: the forward pass agrees with the closed form
    and the noiseless target is OLS (= w_τ)."""
    from analysis import _theorems as th

    depth = th.theorem51_depth(covers=(110.0,), max_steps=3, sequences=300)
    rows = depth["covers"]["110.0"]["depth"]
    assert all(r["closed_form_max_abs_dev"] < 1e-10 for r in rows)
    for r in rows:
        np.testing.assert_allclose(r["all"]["mean"], r["closed_form_mean"], rtol=1e-9)
    two = th.theorem52_vs_n(ns=(20, 40), sequences=200)
    assert "error" in two["regimes"]["fixed"][0] and "at" in two["regimes"]["fixed"][1]
