"""The noiseless column (σ_max = 0) for GD++: typical draws against the tail.

Without noise the oracle is OLS (= w_τ for n ≥ d) and a GD++ model acts on each eigenvector
of Σ = XᵀX separately. With u = 0 and a = 1 (w_xy = w_yy = 0, Theorem 4.1), layer l maps an
eigen-direction of eigenvalue e by m ← m(1 + w_xx^l m² e) (the query's multiplier; Σ^l has
eigenvalue m² e there) and shrinks the remaining fraction of OLS by (1 + w_yx^l m² e):

    1 − t_L(e) = Π_l (1 + w_yx^l m_l(e)² e),   w^L = Σ_i t_L(e_i) (v_iᵀα / e_i) v_i.

So ½‖w^L − w_OLS‖² = ½ Σ_i (1 − t_L(e_i))² (v_iᵀw_τ)², whose mean over w_τ ~ N(0, I) is
½ Σ_i (1 − t_L(e_i))²: a function of the spectrum alone. It is cheap for millions of
sequences (one eigendecomposition each), its gradient in the 2L coefficients is exact, and
it shows the tension the issue names: a polynomial that is ~1 on the typical spectrum to
1e-12 must grow fast outside it, where the rare sequences with a large λ_max are.

The expectation itself (not a draw) is reached as eqicl's tail-aware estimate reaches it
(SPEC §9): a mixture proposal scales the covariates by c_k, which scales every eigenvalue of
Σ by c_k², and each sequence is weighted by f/q, a function of tr Σ = Σ_i e_i alone
(`proposal_spectra`). The same weights make an objective of the expectation (`fit` with
`log_weights`), so the trade-off between the typical draw and the expectation can be traced
by fitting to a mixture of the two objectives (`python -m analysis.noiseless`).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float

from eqicl import Proposal, summarize


def gdpp_remainder(
    coef: Float[Array, "layers 2"], e: Float[Array, "*batch"]
) -> Float[Array, "*batch"]:
    """1 − t_L(e): the fraction of OLS a GD++ model with per-layer (w_xx, w_yx) = `coef`
    (paper units) leaves along an eigenvector of eigenvalue e."""

    def layer(carry, c):
        m2, rem = carry  # m², remaining fraction
        rem = rem * (1.0 + c[1] * m2 * e)
        m2 = m2 * (1.0 + c[0] * m2 * e) ** 2
        return (m2, rem), None

    (_, rem), _ = jax.lax.scan(layer, (jnp.ones_like(e), jnp.ones_like(e)), coef)
    return rem


def expected_losses(coef: Float[Array, "layers 2"], eigs: Float[Array, "batch d"]):
    """½ Σ_i (1 − t_L(e_i))² per sequence: the noiseless loss averaged over w_τ."""
    return 0.5 * jnp.sum(gdpp_remainder(coef, eigs) ** 2, axis=-1)


def spectra(key, sequences: int, d: int = 10, n: int = 20, chunk: int = 100_000) -> np.ndarray:
    """Eigenvalues of XᵀX (ascending) of `sequences` fresh N(0, I) contexts, float64."""
    out = []
    for i, start in enumerate(range(0, sequences, chunk)):
        size = min(chunk, sequences - start)
        x = jr.normal(jr.fold_in(key, i), (size, n, d), jnp.float64)
        out.append(np.asarray(jnp.linalg.eigvalsh(jnp.einsum("bni,bnj->bij", x, x))))
    return np.concatenate(out)


def proposal_spectra(
    eigs: np.ndarray, proposal: Proposal, n: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """The spectra of `eigs` (plain N(0, I) contexts of n rows) as drawn by `proposal`: the
    sequences of component k have their covariates scaled by c_k, so their eigenvalues by
    c_k²; and each sequence's log f/q (`Proposal.log_weight`, from tr Σ). The noiseless loss
    is already averaged over w_τ, so the proposal's w scales play no part (set to 1)."""
    p = dataclasses.replace(proposal, w_scales=(1.0,) * len(proposal.shares))
    batch, d = eigs.shape
    c = np.asarray(p.scales(batch, jnp.float64)[0])
    scaled = eigs * (c**2)[:, None]
    log_w = p.log_weight(jnp.asarray(scaled.sum(-1)), jnp.zeros(batch, jnp.float64), n, d)
    return scaled, np.asarray(log_w)


_losses = jax.jit(expected_losses)


@functools.partial(jax.jit, static_argnums=5)
def _value_grad(theta, c0, e, w, e0, a: float):
    """The objective of `fit` and its gradient in θ. The spectra are arguments, not
    constants closed over (XLA would fold them into every compiled fit); α is static, so a
    term of weight 0 is left out rather than multiplied by a loss that may be inf."""

    def obj(t):
        c = c0 * jnp.exp(t.reshape(c0.shape))
        total = 0.0
        if a > 0:
            total = total + a * jnp.mean(w * expected_losses(c, e))
        if a < 1:
            total = total + (1.0 - a) * jnp.mean(expected_losses(c, e0))
        return jnp.log(total)

    return jax.value_and_grad(obj)(theta)


def fit(
    coef0,
    eigs: np.ndarray,
    iterations: int = 500,
    log_weights: np.ndarray | None = None,
    alpha: float = 1.0,
    plain: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Coefficients minimizing log(mean loss) on the spectra `eigs` (weighted by
    exp(`log_weights`) if given: then the objective is the tail-aware estimate of the
    expectation), or, with `plain` spectra too, log((1 − α)·mean on `plain` + α·that
    estimate). L-BFGS-B (scipy) on the exact gradient, each coefficient as coef0 · exp(θ)
    (signs kept, scales equalised)."""
    from scipy.optimize import minimize

    e, c0 = jnp.asarray(eigs), jnp.asarray(coef0, jnp.float64)
    w = jnp.ones(e.shape[0]) if log_weights is None else jnp.exp(jnp.asarray(log_weights))
    e0 = e[:1] if plain is None else jnp.asarray(plain)
    a = 1.0 if plain is None else float(alpha)

    def value_grad(theta):
        return _value_grad(theta, c0, e, w, e0, a)

    def fun(theta):
        v, g = value_grad(jnp.asarray(theta))
        if not math.isfinite(float(v)):
            return 1e300, np.zeros_like(theta)
        return float(v), np.asarray(g, np.float64)

    res = minimize(
        fun,
        np.zeros(c0.size),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": iterations, "maxcor": 30, "ftol": 0.0, "gtol": 1e-10},
    )
    info = {"iterations": int(res.nit), "message": str(res.message), "objective": float(res.fun)}
    return np.asarray(c0) * np.exp(res.x.reshape(c0.shape)), info


def score(coef, eigs: np.ndarray, log_weights: np.ndarray | None = None) -> dict:
    """`eqicl.summarize` of the per-sequence noiseless losses on `eigs` (importance-weighted
    by exp(`log_weights`) if given), with their median."""
    losses = np.asarray(_losses(jnp.asarray(coef), jnp.asarray(eigs)))
    return summarize(losses, log_weights) | {"median": float(np.median(losses))}
