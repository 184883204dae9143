"""Polishing a trained model: full-batch L-BFGS on the exact objective over a fixed sample.

Adam on fresh batches can stop in a local minimum that a second-order method on a fixed sample
leaves at once, from the model itself or from a perturbed copy (the measurements are in
runs/paper/RESULTS.md). The objective is the one the training uses (½‖wᴸ − μ‖², SPEC §5)
without the per-sequence cap, on `sequences` sequences drawn once, in float64. Meant for
models with few parameters (GD++, DIAG): a FULL model's 242 parameters per layer fit the rare
heavy sequences of the sample instead. A polished model fits its sample: judge it on other
sequences, with an estimate that sees the tail (`eqicl.estimate`).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PRNGKeyArray

from ._config import TaskConfig
from ._evaluate import cast
from ._fast import final_weights, posterior_mean, sample_stats
from ._model import LinearTransformer


def perturb(model: LinearTransformer, key: PRNGKeyArray, scale: float = 0.5) -> LinearTransformer:
    """Another start near `model`: every parameter a becomes a·(1 + scale·ε₁) + 0.04·scale·ε₂
    (ε standard normal), in the model's own units."""
    dynamic, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(dynamic)
    k1, k2 = jr.split(key)
    eps1 = jr.normal(k1, flat.shape, flat.dtype)
    eps2 = jr.normal(k2, flat.shape, flat.dtype)
    return eqx.combine(unravel(flat * (1 + scale * eps1) + 0.04 * scale * eps2), static)


def polish_objective(model: LinearTransformer, task: TaskConfig, key: PRNGKeyArray, sequences: int):
    """(the fixed sample (statistics and posterior means μ), `loss(flat, sample)`,
    `flatten(model)` (its parameters as one float64 vector), `unflatten(flat)`) for models of
    `model`'s structure. The sample is an argument of the loss, not a constant inside it: XLA
    would otherwise constant-fold through it while compiling (it did, for minutes); μ is
    computed once, not at every evaluation."""
    stats = sample_stats(key, task, sequences, jnp.float64, "wishart")
    sample = (stats.s, posterior_mean(stats))
    dynamic, static = eqx.partition(cast(model, jnp.float64), eqx.is_inexact_array)
    unravel = ravel_pytree(dynamic)[1]

    def flatten(m: LinearTransformer) -> Float[Array, " p"]:
        return ravel_pytree(eqx.filter(cast(m, jnp.float64), eqx.is_inexact_array))[0]

    def loss(f: Float[Array, " p"], sample) -> Float[Array, ""]:
        s, mu = sample
        w = final_weights(eqx.combine(unravel(f), static), s)
        return 0.5 * jnp.mean(jnp.sum((w - mu) ** 2, axis=0))

    return sample, loss, flatten, lambda f: eqx.combine(unravel(f), static)


def polish(
    models: list[LinearTransformer],
    task: TaskConfig,
    key: PRNGKeyArray,
    sequences: int = 20_000,
    iterations: int = 50,
    tol: float = 1e-9,
) -> tuple[list[LinearTransformer], list[float]]:
    """Each model of `models` (one structure) after at most `iterations` L-BFGS steps on the
    exact objective over the same `sequences` sequences (drawn from `key`), in float64, with
    its final loss on them; a start stops early once its gradient norm is below `tol` (at a
    minimum the line search cannot make progress and would spend its every step). Needs x64.
    A model whose loss ends non-finite or higher than it started is returned unchanged, with
    its starting loss."""
    if not jax.config.read("jax_enable_x64"):
        raise RuntimeError("polish needs jax_enable_x64 (eqicl's commands turn it on)")
    sample, loss, flatten, unflat = polish_objective(models[0], task, key, sequences)
    starts = [flatten(m) for m in models]
    opt = optax.lbfgs()

    @jax.jit
    def run(f0, sample):
        def fn(f):
            return loss(f, sample)

        value_and_grad = optax.value_and_grad_from_state(fn)

        def step(carry):
            f, state = carry
            value, grad = value_and_grad(f, state=state)
            updates, state = opt.update(grad, state, f, value=value, grad=grad, value_fn=fn)
            return optax.apply_updates(f, updates), state

        def going(carry):
            _, state = carry
            count = optax.tree_utils.tree_get(state, "count")
            grad = optax.tree_utils.tree_get(state, "grad")
            norm = optax.tree_utils.tree_norm(grad)
            return (count == 0) | ((count < iterations) & (norm >= tol))

        f, _ = jax.lax.while_loop(going, step, (f0, opt.init(f0)))
        return f, fn(f0), fn(f)

    out, losses = [], []
    for f0 in starts:
        # optax's L-BFGS adds int32 and int64 counters: allow that under strict promotion.
        with jax.numpy_dtype_promotion("standard"):
            f, before, after = run(f0, sample)
        better = bool(jnp.isfinite(after)) and float(after) <= float(before)
        out.append(unflat(f if better else f0))
        losses.append(float(after if better else before))
    return out, losses
