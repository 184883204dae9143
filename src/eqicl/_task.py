"""The noisy linear-regression task (SPEC §1) and the oracle posterior mean."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._config import NoiseLaw, TaskConfig

PRNG_IMPL = "rbg"


def prng_key(seed: int) -> PRNGKeyArray:
    """The root key of a run or an evaluation. `rbg` draws bits with XLA's RngBitGenerator
    (split and fold_in stay threefry): deterministic on a given backend, and it compiles much
    faster than threefry on XLA:CPU, which dominates short runs, resumes and tests."""
    return jr.key(seed, impl=PRNG_IMPL)


class Batch(eqx.Module):
    """A batch of regression sequences.

    `x`, `y`: the n context pairs; `xq`, `yq`: the query and its noiseless target;
    `w`: the task vector w_τ; `sigma`: the noise standard deviation σ_τ of each sequence.
    """

    x: Float[Array, "batch n d"]
    y: Float[Array, "batch n"]
    xq: Float[Array, "batch d"]
    yq: Float[Array, " batch"]
    w: Float[Array, "batch d"]
    sigma: Float[Array, " batch"]


def sample_sigma(
    key: PRNGKeyArray, task: TaskConfig, batch: int, dtype=jnp.float32
) -> Float[Array, " batch"]:
    """σ_τ for `batch` sequences from the task's noise distribution (a built-in kind, or an
    `eqicl.NoiseLaw` of one's own)."""
    if isinstance(task.noise, NoiseLaw):
        return jnp.asarray(task.noise.sample(key, batch, dtype), dtype)
    if task.noise == "uniform":
        return jr.uniform(key, (batch,), dtype, 0.0, task.sigma_max)
    if task.noise == "categorical":
        levels = jnp.asarray(task.sigma_set, dtype)
        return levels[jr.randint(key, (batch,), 0, len(task.sigma_set))]
    return jnp.full((batch,), task.sigma, dtype)


def sample_batch(
    key: PRNGKeyArray,
    task: TaskConfig,
    batch: int,
    dtype=jnp.float32,
    sigma: Float[Array, " batch"] | None = None,
    x_scale: Float[Array, " batch"] | None = None,
    w_scale: Float[Array, " batch"] | None = None,
    e_scale: Float[Array, " batch"] | None = None,
) -> Batch:
    """Sample `batch` sequences: w ~ N(0, I), x_i, x_t ~ N(0, I), y_i = <w, x_i> + σ ξ_i,
    y_t = <w, x_t> (noiseless). Pass `sigma` to fix each sequence's noise level instead of
    drawing it from the task (per-variance profiles). `x_scale` / `w_scale` multiply each
    sequence's context covariates / task vector (an importance-sampling proposal,
    `eqicl.Proposal`; the query keeps its law), `e_scale` its standard-normal label noise ξ;
    scale 1 gives the same sequences as none. `noise_draws` gives the ξ of such a batch."""
    kw, kx, kq, kn, ks = jr.split(key, 5)
    w = jr.normal(kw, (batch, task.d), dtype)
    x = jr.normal(kx, (batch, task.n, task.d), dtype)
    if w_scale is not None:
        w = w * w_scale[:, None]
    if x_scale is not None:
        x = x * x_scale[:, None, None]
    xq = jr.normal(kq, (batch, task.d), dtype)
    if sigma is None:
        sigma = sample_sigma(ks, task, batch, dtype)
    else:
        sigma = jnp.broadcast_to(jnp.asarray(sigma, dtype), (batch,))
    noise = noise_draws(key, task, batch, dtype, e_scale)
    y = jnp.einsum("bnd,bd->bn", x, w) + sigma[:, None] * noise
    yq = jnp.einsum("bd,bd->b", xq, w)
    return Batch(x=x, y=y, xq=xq, yq=yq, w=w, sigma=sigma)


def noise_draws(
    key: PRNGKeyArray,
    task: TaskConfig,
    batch: int,
    dtype=jnp.float32,
    e_scale: Float[Array, " batch"] | None = None,
) -> Float[Array, "batch n"]:
    """The label noise ξ (before σ_τ multiplies it) of `sample_batch(key, ...)`'s sequences:
    what an importance weight of a noise-scaling proposal needs (σ_τ can be 0)."""
    kn = jr.split(key, 5)[3]
    noise = jr.normal(kn, (batch, task.n), dtype)
    return noise if e_scale is None else noise * e_scale[:, None]


# `sample_batch` compiled as one program, for evaluation (which samples outside any jit).
sample_batch_jit = jax.jit(sample_batch, static_argnames=("task", "batch", "dtype"))


def statistics(
    x: Float[Array, "n d"], y: Float[Array, " n"]
) -> tuple[Float[Array, "d d"], Float[Array, " d"], Float[Array, ""]]:
    """Σ = Σ_i x_i x_iᵀ, α = Σ_i y_i x_i, λ = Σ_i y_i² (unnormalized, as in the paper)."""
    return x.T @ x, x.T @ y, y @ y


def ridge(
    x: Float[Array, "n d"], y: Float[Array, " n"], lam: Float[Array, ""] | float
) -> Float[Array, " d"]:
    """Ridge weights (Σ + λI)⁻¹α (SPEC §4)."""
    sigma_, alpha, _ = statistics(x, y)
    return jnp.linalg.solve(sigma_ + lam * jnp.eye(x.shape[-1], dtype=x.dtype), alpha)


def oracle_weights(
    x: Float[Array, "n d"], y: Float[Array, " n"], sigma: Float[Array, ""]
) -> Float[Array, " d"]:
    """The posterior mean μ = (Σ + σ²I)⁻¹α of w_τ given the context: ridge with λ = σ_τ²."""
    return ridge(x, y, sigma**2)


batch_oracle_weights = jax.vmap(oracle_weights)
