"""The polish step (eqicl._polish): L-BFGS on the exact objective over a fixed sample."""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.flatten_util import ravel_pytree

import eqicl
from eqicl._evaluate import cast
from eqicl._fast import posterior_mean, sample_stats
from eqicl._polish import perturb, polish, polish_objective
from eqicl._sweep import Cell, cell_config


def _cell(model="gdpp", layers=1, column="1"):
    config = cell_config(Cell(model, layers, column), None, 1)
    model = eqicl.init_transformer(jr.key(3), config.model, config.task, jnp.float64)
    return config, model


def test_polish_reaches_the_one_layer_optimum_and_never_worsens_a_start():
    """One GD++ layer predicts with w = c·α (α = Σ y_i x_i; w_xx moves only the query, after
    it is read), so the best loss on a fixed sample is ½·mean‖c*α − μ‖² with
    c* = Σ<α, μ> / Σ‖α‖², in closed form; a convex problem in c, so a perturbed start
    reaches it too. A start that cannot be improved (non-finite) comes back unchanged."""
    config, model = _cell()
    key = jr.key(7)
    wild = perturb(model, jr.key(5), scale=0.5)
    broken = eqx.tree_at(lambda m: m.layers.p, model, model.layers.p.at[0, 0, 0].set(jnp.inf))
    starts = [model, wild, broken]
    out, losses = polish(starts, config.task, key, sequences=3000, iterations=30)
    st = sample_stats(key, config.task, 3000, jnp.float64, "wishart")
    d = config.task.d
    alpha, mu = np.asarray(st.s[:d, d]), np.asarray(posterior_mean(st))
    c = np.sum(alpha * mu) / np.sum(alpha * alpha)
    want = 0.5 * np.mean(np.sum((c * alpha - mu) ** 2, axis=0))
    sample, loss_fn, flatten, _ = polish_objective(model, config.task, key, 3000)

    def objective(m):
        return float(loss_fn(flatten(m), sample))

    for start, end, loss in zip(starts[:2], out[:2], losses[:2], strict=True):
        np.testing.assert_allclose(loss, want, rtol=1e-10)
        np.testing.assert_allclose(objective(end), want, rtol=1e-10)
        assert objective(start) > want * (1 + 1e-3)  # neither start was optimal
    assert not np.isfinite(losses[2])
    assert eqx.tree_equal(out[2], cast(broken, jnp.float64))


def test_perturb_moves_every_parameter_and_keeps_the_structure():
    _, model = _cell("diag", 2, "3")
    other = perturb(model, jr.key(0))
    a, b = (ravel_pytree(eqx.filter(m, eqx.is_inexact_array))[0] for m in (model, other))
    assert a.shape == b.shape and bool(jnp.all(a != b))
    assert eqx.tree_equal(
        eqx.filter(model, eqx.is_array, inverse=True), eqx.filter(other, eqx.is_array, inverse=True)
    )
