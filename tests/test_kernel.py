"""The compiled CPU kernel (eqicl._kernel) against the paper's token equation and plain
autodiff, in float64."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from scipy import special

import eqicl
from eqicl import _fast, _kernel
from eqicl._train import loss_fn

F64 = jnp.float64

pytestmark = pytest.mark.skipif(not _kernel.load(), reason=f"kernel: {_kernel.reason()}")


def _model(kind, task, heads, layers, seed=0):
    cfg = eqicl.ModelConfig(kind=kind, layers=layers, heads=heads, init="gd", init_scale=0.05)
    return eqicl.init_transformer(jr.key(seed), cfg, task, F64)


def _plain_weights(model, s):
    """wᴸ by the plain Sˡ recursion, one sequence at a time, differentiated by JAX itself."""

    def one(s1):
        big_d = s1.shape[0]
        c = jnp.eye(big_d, dtype=s1.dtype)
        for i in range(model.num_layers):
            t = jnp.eye(big_d, dtype=s1.dtype) + model.layer(i).operator(s1)
            s1, c = t @ s1 @ t.T, t @ c
        return -c[-1, :-1]

    return jax.vmap(one, in_axes=2, out_axes=1)(s)


# D = 11 is the paper's width; D = 5 and D = 14 exercise the padding to a multiple of 12 and a
# second padded size. 37 sequences leave a partial tile of lanes.
@pytest.mark.parametrize("kind", ["full", "diag", "gdpp"])
@pytest.mark.parametrize(("d", "heads", "layers"), [(10, 1, 3), (4, 2, 4), (13, 1, 2)])
def test_weights_equal_the_token_forward_pass(kind, d, heads, layers):
    task = eqicl.TaskConfig(d=d, n=d + 6, sigma_max=1.5)
    model = _model(kind, task, heads, layers)
    batch = eqicl.sample_batch(jr.key(1), task, 37, F64)
    want = jax.vmap(model.implicit_weights)(batch.x, batch.y)  # (batch, layers, d)
    s = _fast.context_stats(batch.x, batch.y)
    got = _kernel.layer_weights(model, s)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(jnp.transpose(got, (2, 0, 1)), want, rtol=1e-11, atol=1e-13 * scale)
    np.testing.assert_allclose(
        _kernel.final_weights(model, s).T, want[:, -1], rtol=1e-11, atol=1e-13 * scale
    )


@pytest.mark.parametrize("kind", ["full", "diag", "gdpp"])
@pytest.mark.parametrize("objective", ["exact", "sampled"])
def test_loss_and_gradient_equal_the_token_formulation(kind, objective):
    """Same sequences: the kernel's loss and parameter gradient equal those of the token
    equation differentiated by JAX."""
    task = eqicl.TaskConfig(d=10, n=20, sigma_max=2.0)
    model = _model(kind, task, heads=2, layers=4)
    batch = eqicl.sample_batch(jr.key(2), task, 40, F64)
    train = eqicl.TrainConfig(objective=objective, loss_clip=0.0)
    grad = eqx.filter_value_and_grad(loss_fn)
    want_loss, want_grad = grad(model, batch, train)
    st = _fast.stats_from_batch(batch)
    got_loss, got_grad = grad(model, st, train)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-11)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12 * float(jnp.max(jnp.abs(w))))


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_statistics_cotangent_equals_autodiff(kind):
    """The gradient with respect to S⁰ is JAX's own gradient of the plain recursion."""
    task = eqicl.TaskConfig(d=4, n=9, sigma_max=1.0)
    model = _model(kind, task, heads=2, layers=3)
    batch = eqicl.sample_batch(jr.key(3), task, 19, F64)
    s = _fast.context_stats(batch.x, batch.y)
    g = jr.normal(jr.key(4), (4, 19), F64)
    got = jax.vjp(lambda s: _kernel.final_weights(model, s), s)[1](g)[0]
    want = jax.vjp(lambda s: _plain_weights(model, s), s)[1](g)[0]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13 * float(jnp.max(jnp.abs(want))))


def test_seed_ensemble_under_vmap():
    """vmap over stacked models (the seed ensemble) gives each member's own result."""
    task = eqicl.TaskConfig(d=10, n=20, sigma_max=3.0)
    models = eqx.filter_vmap(lambda k: _model("full", task, 1, 2, seed=k))(jnp.arange(3))
    st = _fast.stats_from_batch(eqicl.sample_batch(jr.key(5), task, 24, F64))

    def loss(m):
        return jnp.mean(_kernel.final_weights(m, st.s) ** 2)

    got = eqx.filter_vmap(eqx.filter_grad(loss))(models)
    for i in range(3):
        member = jax.tree.map(lambda a, i=i: a[i] if eqx.is_array(a) else a, models)
        want = eqx.filter_grad(lambda m: jnp.mean(_plain_weights(m, st.s) ** 2))(member)
        np.testing.assert_allclose(got.layers.p[i], want.layers.p, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(got.layers.q[i], want.layers.q, rtol=1e-10, atol=1e-14)


def test_float32_agrees_with_float64():
    task = eqicl.TaskConfig(d=10, n=20, sigma_max=3.0)
    model = _model("diag", task, 1, 5)
    s = _fast.context_stats(*(lambda b: (b.x, b.y))(eqicl.sample_batch(jr.key(6), task, 50, F64)))
    w64 = _kernel.final_weights(model, s)
    m32 = jax.tree.map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, model)
    w32 = _kernel.final_weights(m32, s.astype(jnp.float32))
    assert w32.dtype == jnp.float32
    np.testing.assert_allclose(w32, w64, rtol=2e-4, atol=2e-5 * float(jnp.max(jnp.abs(w64))))


def test_bad_operands_are_refused():
    s = jnp.zeros((11, 11, 4), F64)
    p = jnp.zeros((2, 1, 10, 10), F64)
    with pytest.raises(Exception, match="expected s"):
        jax.block_until_ready(_kernel._forward(s, p, p, 0, False))
    with pytest.raises(Exception, match="share a dtype"):
        q = jnp.zeros((2, 1, 11, 11), jnp.float32)
        jax.block_until_ready(_kernel._forward(s, q.astype(F64), q, 0, False))


def test_training_uses_the_kernel_and_matches_the_xla_path(monkeypatch):
    """A few float64 training steps give the same model with and without the kernel."""
    from eqicl._train import init_ensemble, make_train_chunk

    config = eqicl.preset("tiny", ["train.dtype=float64", "train.steps=10", "model.layers=3"])
    assert config.train.formulation == "stats"
    traced = []
    original = _kernel.final_weights
    monkeypatch.setattr(
        _kernel, "final_weights", lambda m, s: traced.append(s.shape) or original(m, s)
    )
    chunk = make_train_chunk(config, 10)
    with_kernel, _ = chunk(jnp.arange(config.train.seeds), init_ensemble(config))
    assert traced, "the training step did not go through the kernel"
    monkeypatch.setattr(_kernel, "usable", lambda: False)
    chunk = make_train_chunk(config, 10)
    without, _ = chunk(jnp.arange(config.train.seeds), init_ensemble(config))
    for a, b in zip(
        jax.tree.leaves(eqx.filter(with_kernel.model, eqx.is_array)),
        jax.tree.leaves(eqx.filter(without.model, eqx.is_array)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


# n = 6 ≥ D: Bartlett with χ² of 6, 5, 4, 3 degrees of freedom; n = 4: down to χ²_1 (drawn as a
# squared normal); n = 2 < D: the sum of outer products itself.
@pytest.mark.parametrize("n", [6, 4, 2])
def test_wishart_sampler_has_the_token_distribution(n):
    """S⁰ drawn by the kernel has the distribution of Σ_j e_j e_jᵀ of sampled tokens: mean and
    variance of every entry, E[log det Σ] (exact for Wishart), and the joint law of the query
    with the statistics, within sampling error (100,000 sequences each)."""
    task = eqicl.TaskConfig(d=3, n=n, noise="categorical", sigma_set=(0.5, 2.0))
    m = 100_000
    wish = _fast.sample_stats(jr.key(8), task, m, F64, "wishart")
    tok = _fast.sample_stats(jr.key(9), task, m, F64, "tokens")
    for a, b in ((wish.s, tok.s), (wish.xq, tok.xq), (wish.yq, tok.yq), (wish.sigma, tok.sigma)):
        a, b = np.asarray(a), np.asarray(b)
        se = np.sqrt(a.var(-1) / m + b.var(-1) / m)
        np.testing.assert_array_less(np.abs(a.mean(-1) - b.mean(-1)), 5 * se + 1e-12)
        np.testing.assert_allclose(a.var(-1), b.var(-1), rtol=0.08)
    d = task.d
    if n > d:
        logdet = np.linalg.slogdet(np.transpose(np.asarray(wish.s[:d, :d]), (2, 0, 1)))[1]
        want = sum(special.digamma((n - i) / 2) for i in range(d)) + d * math.log(2)
        np.testing.assert_allclose(logdet.mean(), want, atol=5 * logdet.std() / math.sqrt(m))
    # y_t = <w, x_t> with the same w as in S: the covariance of y_t with <x_t, α> matches.
    cov_w = np.mean(np.asarray(wish.yq) * np.asarray(jnp.sum(wish.xq * wish.s[:d, d], 0)))
    cov_t = np.mean(np.asarray(tok.yq) * np.asarray(jnp.sum(tok.xq * tok.s[:d, d], 0)))
    np.testing.assert_allclose(cov_w, cov_t, rtol=0.1)


def test_wishart_sampler_is_deterministic_whatever_the_threads(monkeypatch):
    task = eqicl.TaskConfig(d=10, n=20, sigma_max=2.0)
    draw = jax.jit(lambda k: _kernel.sample_wishart(k, task.n, 11, 100, 7, F64))
    monkeypatch.setenv("EQICL_KERNEL_THREADS", "1")
    one = draw(jr.key(3))
    monkeypatch.setenv("EQICL_KERNEL_THREADS", "2")
    two = draw(jr.key(3))
    other = draw(jr.key(4))
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(one[0], other[0])
    np.testing.assert_allclose(one[0], jnp.swapaxes(one[0], 0, 1))


def test_kernel_normals_are_standard_normal():
    """The ziggurat normals: Kolmogorov–Smirnov against Φ on 10⁶ draws, and the mass beyond
    3.5 (the ziggurat's tail region starts at 3.44) within 4 standard errors."""
    from scipy import stats

    _, z = _kernel.sample_wishart(jr.key(11), 20, 11, 50_000, 20, F64)
    z = np.asarray(z).ravel()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    p = 2 * stats.norm.sf(3.5)
    tail = np.mean(np.abs(z) > 3.5)
    assert abs(tail - p) < 4 * math.sqrt(p * (1 - p) / z.size)
    se = np.sqrt(np.array([1.0, 2.0, 24.0]) / z.size)  # of the mean, variance, excess kurtosis
    np.testing.assert_array_less(np.abs([z.mean(), z.var() - 1, stats.kurtosis(z)]), 5 * se)


@pytest.mark.parametrize("d", [6, 10])
def test_posterior_mean_equals_the_oracle_weights(d):
    task = eqicl.TaskConfig(d=d, n=d + 4, sigma_max=2.0)
    batch = eqicl.sample_batch(jr.key(12), task, 45, F64)
    st = _fast.stats_from_batch(batch)
    want = jax.vmap(eqicl.oracle_weights)(batch.x, batch.y, batch.sigma)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(
        _kernel.posterior_mean(st.s, st.sigma).T, want, rtol=1e-10, atol=1e-13 * scale
    )
    got32 = _kernel.posterior_mean(st.s.astype(jnp.float32), st.sigma.astype(jnp.float32))
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(got32.T, want, rtol=1e-4, atol=1e-5)


def test_describe_says_which_implementation_runs():
    train = eqicl.TrainConfig(devices=1)
    assert _kernel.describe(train) == "statistics formulation (eqicl CPU kernel)"
    assert "token equation" in _kernel.describe(eqicl.TrainConfig(formulation="tokens"))
