"""Property tests: the sampler and the three transformers keep their invariants across shapes
(d, n, heads, layers) and noise settings. Few examples on small shapes: each new shape costs
a compile, which dominates."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from hypothesis import given, settings, strategies as st

import eqicl
from eqicl import FullAttention, LinearTransformer

F64 = jnp.float64
FEW = settings(max_examples=5, deadline=None, database=None, derandomize=True)

dims = st.integers(1, 5)
contexts = st.integers(1, 9)
kinds = st.sampled_from(["full", "diag", "gdpp"])
levels = st.floats(0.0, 4.0, allow_nan=False)


# Strategies draw plain fields; the configs are built in the tests, because beartype checks
# a tuple field by sampling it with the global `random`, which hypothesis forbids inside
# strategies.
@st.composite
def tasks(draw) -> dict:
    noise = draw(st.sampled_from(["uniform", "categorical", "fixed"]))
    return dict(
        d=draw(dims),
        n=draw(contexts),
        noise=noise,
        sigma_max=draw(levels),
        sigma_set=tuple(draw(st.lists(levels, min_size=1, max_size=3))),
        sigma=draw(levels),
    )


@st.composite
def model_configs(draw, kind=None) -> tuple[dict, dict, int]:
    """A task, a transformer config with bounded weights (|w| of order `init_scale` around
    the GD start or zero) and a seed. The model is built in the test: building it here
    would count its compile as data generation."""
    task = draw(tasks())
    cfg = dict(
        kind=draw(kinds) if kind is None else kind,
        layers=draw(st.integers(1, 3)),
        heads=draw(st.integers(1, 3)),
        units=draw(st.sampled_from(["scaled", "paper"])),
        init=draw(st.sampled_from(["gd", "normal"])),
        init_scale=0.05,
    )
    return task, cfg, draw(st.integers(0, 99))


def _build(tmc) -> tuple[eqicl.TaskConfig, LinearTransformer]:
    task, cfg, seed = tmc
    task = eqicl.TaskConfig(**task)
    return task, eqicl.init_transformer(jr.key(seed), eqicl.ModelConfig(**cfg), task, F64)


def _stack(layers) -> LinearTransformer:
    """Stack single layers into a LinearTransformer (as the model stores them)."""
    return LinearTransformer(
        layers=jax.tree.map(lambda *a: jnp.stack(a), *layers), num_layers=len(layers)
    )


# One jitted program per example: eager mode would compile every operation for every shape.
_sample = jax.jit(eqicl.sample_batch, static_argnums=(1, 2, 3))


@eqx.filter_jit
def _forward(model: LinearTransformer, x, y, xq, perm):
    """Predictions, implicit weights, and predictions with the context permuted."""
    return model(x, y, xq), model.implicit_weights(x, y), model(x[perm], y[perm], xq)


@eqx.filter_jit
def _diag_and_full(model: LinearTransformer, x, y, xq):
    p, q = model.pq()
    full = _stack([FullAttention(p=p[i], q=q[i]) for i in range(model.num_layers)])
    return model(x, y, xq), full(x, y, xq), p, q


@FEW
@given(task=tasks(), batch=st.integers(1, 4), seed=st.integers(0, 99))
def test_sampler_shapes_noise_and_noiseless_query(task, batch, seed):
    task = eqicl.TaskConfig(**task)
    b = _sample(jr.key(seed), task, batch, F64)
    d, n = task.d, task.n
    shapes = (b.x.shape, b.y.shape, b.xq.shape, b.yq.shape, b.w.shape, b.sigma.shape)
    assert shapes == ((batch, n, d), (batch, n), (batch, d), (batch,), (batch, d), (batch,))
    for leaf in (b.x, b.y, b.xq, b.yq, b.w, b.sigma):
        assert leaf.dtype == F64 and bool(jnp.all(jnp.isfinite(leaf)))
    sigma = np.asarray(b.sigma)
    if task.noise == "uniform":
        assert np.all((sigma >= 0) & (sigma <= task.sigma_max))
    elif task.noise == "categorical":
        assert set(sigma.tolist()) <= set(task.sigma_set)
    else:
        assert np.all(sigma == task.sigma)
    # The query target is noiseless; without noise the context is exactly linear too.
    np.testing.assert_allclose(b.yq, np.einsum("bd,bd->b", b.xq, b.w), rtol=1e-12, atol=1e-12)
    residual = np.asarray(b.y) - np.einsum("bnd,bd->bn", b.x, b.w)
    np.testing.assert_allclose(residual[sigma == 0], 0.0, atol=1e-12)


@FEW
@given(tmc=model_configs(), m=st.integers(1, 3), seed=st.integers(0, 99))
def test_model_shapes_finiteness_and_context_order(tmc, m, seed):
    """Shapes; finite predictions for bounded weights; and the same predictions for any
    order of the context, which every layer sees only through Σ_j e_j e_jᵀ."""
    task, model = _build(tmc)
    b = _sample(jr.key(seed), task, m, F64)
    perm = jr.permutation(jr.key(seed + 1), task.n)
    preds, w, permuted = _forward(model, b.x[0], b.y[0], b.xq, perm)
    assert preds.shape == (model.num_layers, m) and w.shape == (model.num_layers, task.d)
    assert bool(jnp.all(jnp.isfinite(preds))) and bool(jnp.all(jnp.isfinite(w)))
    np.testing.assert_allclose(permuted, preds, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(preds, w @ b.xq.T, rtol=1e-10, atol=1e-12)


@FEW
@given(tmc=model_configs(kind="diag"), seed=st.integers(0, 99))
def test_diag_equals_full_with_the_diagonal_structure(tmc, seed):
    """A DIAG model equals the FULL model built from its P_k, Q_k (in paper units), and those
    matrices have the diagonal structure diag(p_x I, p_y)."""
    task, model = _build(tmc)
    b = _sample(jr.key(seed), task, 2, F64)
    diag, full, p, q = _diag_and_full(model, b.x[0], b.y[0], b.xq)
    np.testing.assert_allclose(full, diag, rtol=1e-10, atol=1e-12)
    d = task.d
    for mat in (np.asarray(p), np.asarray(q)):
        diagonal = np.diagonal(mat, axis1=-2, axis2=-1)
        np.testing.assert_array_equal(mat, diagonal[..., :, None] * np.eye(d + 1))
        np.testing.assert_array_equal(
            diagonal[..., :d], np.broadcast_to(diagonal[..., :1], diagonal[..., :d].shape)
        )
