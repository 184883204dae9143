"""The statistics formulation in XLA (eqicl._fast, what runs on GPUs and device meshes)
against the paper's token equation, in float64. The compiled CPU kernel, which replaces it
on a single CPU device, has its own tests in test_kernel.py."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqicl
from eqicl import _fast
from eqicl._train import loss_fn

F64 = jnp.float64


def _model(kind, task, heads=2, layers=3, seed=0):
    cfg = eqicl.ModelConfig(kind=kind, layers=layers, heads=heads, init="gd", init_scale=0.05)
    return eqicl.init_transformer(jr.key(seed), cfg, task, F64)


@pytest.mark.parametrize("kind", ["full", "diag", "gdpp"])
def test_layer_weights_equal_the_token_forward_pass(kind):
    """wˡ from Sˡ⁺¹ = (I+Tˡ) Sˡ (I+Tˡ)ᵀ equals the token equation's implicit weights after
    every layer, and the last layer's row recursion gives the same wᴸ."""
    task = eqicl.TaskConfig(d=4, n=9, sigma_max=1.0)
    model = _model(kind, task)
    batch = eqicl.sample_batch(jr.key(1), task, 7, F64)
    want = jax.vmap(model.implicit_weights)(batch.x, batch.y)  # (batch, layers, d)
    st = _fast.stats_from_batch(batch)
    got = _fast.xla_layer_weights(model, st.s)  # (layers, d, batch)
    np.testing.assert_allclose(jnp.transpose(got, (2, 0, 1)), want, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(
        _fast.xla_final_weights(model, st.s).T, want[:, -1], rtol=1e-11, atol=1e-12
    )


@pytest.mark.parametrize("kernel", [True, False])
def test_evaluation_takes_the_statistics_path_with_or_without_the_kernel(kernel, monkeypatch):
    """eqicl.model_weights_and_predictions (every evaluation) computes wˡ from the statistics,
    through the kernel or, where it does not apply (another backend, a mesh), through XLA,
    the same path as training; either gives the token equation's weights and predictions."""
    if not kernel:
        monkeypatch.setattr(_fast._kernel, "usable", lambda: False)
    elif not _fast._kernel.usable():
        pytest.skip("the compiled kernel is not available here")
    task = eqicl.TaskConfig(d=4, n=9, sigma_max=1.0)
    model = _model("full", task, layers=3)
    batch = eqicl.sample_batch(jr.key(2), task, 6, F64)
    want = jax.vmap(model.implicit_weights)(batch.x, batch.y)
    # A fresh function object, so that the patched `usable` is traced, not a cached program.
    w, pred = eqicl.model_weights_and_predictions.__wrapped__(model, batch.x, batch.y, batch.xq)
    np.testing.assert_allclose(w, want, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(pred, jnp.einsum("bld,bd->bl", want, batch.xq), rtol=1e-11)


@pytest.mark.parametrize("kind", ["full", "diag", "gdpp"])
@pytest.mark.parametrize("objective", ["exact", "sampled"])
def test_loss_and_gradient_equal_the_token_formulation(kind, objective, monkeypatch):
    """Same sequences (tokens sampler): the fast loss and its gradient (hand-written VJP)
    equal those of the token formulation to round-off."""
    monkeypatch.setattr(_fast._kernel, "usable", lambda: False)
    task = eqicl.TaskConfig(d=5, n=12, sigma_max=2.0)
    model = _model(kind, task, heads=1 if kind == "full" else 2, layers=4)
    batch = eqicl.sample_batch(jr.key(2), task, 16, F64)
    train = eqicl.TrainConfig(objective=objective, loss_clip=0.0)
    grad = eqx.filter_value_and_grad(loss_fn)
    want_loss, want_grad = grad(model, batch, train)
    got_loss, got_grad = grad(model, _fast.stats_from_batch(batch), train)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-11)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12 * float(jnp.max(jnp.abs(w))))


def test_sandwich_vjp_matches_autodiff():
    a = jr.normal(jr.key(3), (4, 4, 5), F64)
    s = jr.normal(jr.key(4), (4, 4, 5), F64)
    s = s + jnp.swapaxes(s, 0, 1)
    g = jr.normal(jr.key(5), (4, 4, 5), F64)

    def plain(a, s):
        return jnp.einsum("ijb,jkb,lkb->ilb", a, s, a)

    np.testing.assert_allclose(_fast.sandwich(a, s), plain(a, s), rtol=1e-13)
    ga, _ = jax.vjp(_fast.sandwich, a, s)[1](g)
    wa, ws = jax.vjp(plain, a, s)[1](g)
    np.testing.assert_allclose(ga, wa, rtol=1e-12)
    # Only the symmetric part of the S-cotangent is returned (S is always symmetric).
    _, gs = jax.vjp(_fast.sandwich, a, s)[1](g)
    np.testing.assert_allclose(gs, 0.5 * (ws + jnp.swapaxes(ws, 0, 1)), rtol=1e-12)


def test_spd_solve_and_posterior_mean(monkeypatch):
    monkeypatch.setattr(_fast._kernel, "usable", lambda: False)
    task = eqicl.TaskConfig(d=6, n=10, sigma_max=2.0)
    batch = eqicl.sample_batch(jr.key(6), task, 9, F64)
    st = _fast.stats_from_batch(batch)
    np.testing.assert_allclose(
        _fast.posterior_mean(st).T,
        jax.vmap(eqicl.oracle_weights)(batch.x, batch.y, batch.sigma),
        rtol=1e-11,
    )
