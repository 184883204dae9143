"""Closed-form baselines (SPEC §4) in the eigenbasis of each sequence's Σ.

With Σ = V diag(e) Vᵀ and a = Vᵀα, ridge with any λ is ŵ = V a / (e + λ), k GD steps from 0
with step η are ŵ = V (1 − (1 − ηe)^k) a / e, and the oracle is ridge with λ = σ_τ². So one
eigendecomposition per sequence lets every baseline, and every candidate hyper-parameter,
be scored exactly and cheaply: the adjusted loss of ŵ is ½‖ŵ − μ‖² in expectation over the
query and the posterior (SPEC §5).
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._task import Batch


class Spectral(eqx.Module):
    """Per-sequence eigen-view of a batch: Σ = V diag(e) Vᵀ, a = Vᵀα, q = Vᵀx_t."""

    e: Float[Array, "batch d"]
    v: Float[Array, "batch d d"]
    a: Float[Array, "batch d"]
    q: Float[Array, "batch d"]
    yy: Float[Array, " batch"]
    yq: Float[Array, " batch"]
    sigma: Float[Array, " batch"]
    n: int = eqx.field(static=True)

    @property
    def oracle(self) -> Float[Array, "batch d"]:
        """μ = (Σ + σ²I)⁻¹α in eigen-coordinates."""
        return self.a / (self.e + self.sigma[:, None] ** 2)

    @property
    def rss(self) -> Float[Array, " batch"]:
        """Residual sum of squares of OLS: Σ y_i² − αᵀΣ⁻¹α."""
        return jnp.maximum(self.yy - jnp.sum(self.a**2 / self.e, axis=-1), 0.0)

    def to_coords(self, w: Float[Array, "batch d"]) -> Float[Array, "batch d"]:
        """Express weight vectors in each sequence's eigenbasis."""
        return jnp.einsum("bji,bj->bi", self.v, w)


@jax.jit
def spectral(batch: Batch) -> Spectral:
    sig = jnp.einsum("bni,bnj->bij", batch.x, batch.x)
    alpha = jnp.einsum("bni,bn->bi", batch.x, batch.y)
    e, v = jnp.linalg.eigh(sig)
    e = jnp.maximum(e, 0.0)
    return Spectral(
        e=e,
        v=v,
        a=jnp.einsum("bji,bj->bi", v, alpha),
        q=jnp.einsum("bji,bj->bi", v, batch.xq),
        yy=jnp.sum(batch.y**2, axis=-1),
        yq=batch.yq,
        sigma=batch.sigma,
        n=batch.x.shape[1],
    )


def ridge_coords(sp: Spectral, lam: Float[Array, " batch"]) -> Float[Array, "batch d"]:
    return sp.a / (sp.e + lam[:, None])


def gd_coords(sp: Spectral, eta: Float[Array, ""], steps: int) -> Float[Array, "batch d"]:
    """`steps` steps of GD on ½Σ(y_i − <w, x_i>)² from w = 0 with step size η."""
    shrink = 1.0 - (1.0 - eta * sp.e) ** steps
    small = sp.e < 1e-12
    safe_e = jnp.where(small, 1.0, sp.e)
    return jnp.where(small, steps * eta * sp.a, shrink * sp.a / safe_e)


def exact_loss(sp: Spectral, coords: Float[Array, "... batch d"]) -> Float[Array, "... batch"]:
    """Adjusted loss ½‖ŵ − μ‖² of each sequence (exact in expectation)."""
    return 0.5 * jnp.sum((coords - jnp.broadcast_to(sp.oracle, coords.shape)) ** 2, axis=-1)


def sampled_loss(sp: Spectral, coords: Float[Array, "... batch d"]) -> Float[Array, "... batch"]:
    """Adjusted loss ½(ŷ − y_t)² − ½(ŷ_oracle − y_t)² on the sampled query."""
    pred = jnp.sum(coords * jnp.broadcast_to(sp.q, coords.shape), axis=-1)
    orc = jnp.sum(sp.oracle * sp.q, axis=-1)
    yq = jnp.broadcast_to(sp.yq, pred.shape)
    return 0.5 * (pred - yq) ** 2 - jnp.broadcast_to(0.5 * (orc - sp.yq) ** 2, pred.shape)


def posterior_trace(sp: Spectral) -> Float[Array, " batch"]:
    """½ tr C, C = σ²(Σ + σ²I)⁻¹: what the oracle's own (unadjusted) loss is in expectation."""
    s2 = sp.sigma[:, None] ** 2
    return 0.5 * jnp.sum(s2 / (sp.e + s2), axis=-1)


def _refine(score, grid: np.ndarray) -> float:
    """Minimize `score` (vectorized over candidates) on a grid, then on a finer grid between the
    best point's neighbours."""
    values = score(grid)
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    fine = np.linspace(lo, hi, 41)
    fine_values = score(fine)
    j = int(np.argmin(fine_values))
    return float(fine[j]) if fine_values[j] <= values[i] else float(grid[i])


@dataclasses.dataclass(frozen=True)
class TunedBaselines:
    """Hyper-parameters of the tuned baselines, fitted on tuning sequences."""

    const_lambda: float
    tuned_c: float
    tuned_max: float
    gd_steps: int
    gd_eta: float

    def coords(self, sp: Spectral) -> dict[str, Float[Array, "batch d"]]:
        """Every baseline's weights in eigen-coordinates, keyed by method name."""
        out = {
            "oracle": sp.oracle,
            "constrr": ridge_coords(sp, jnp.full_like(sp.yq, self.const_lambda)),
            f"gd{self.gd_steps}": gd_coords(
                sp, jnp.asarray(self.gd_eta, sp.e.dtype), self.gd_steps
            ),
        }
        d = sp.e.shape[-1]
        if sp.n > d:  # OLS, AdaRR and TunedRR need Σ invertible and n > d
            ada = sp.rss / (sp.n - d)
            out["ols"] = sp.a / sp.e
            out["adarr"] = ridge_coords(sp, ada)
            out["tunedrr"] = ridge_coords(sp, jnp.minimum(self.tuned_c * ada, self.tuned_max))
        return out


@jax.jit
def _const_scores(sp: Spectral, lams: Float[Array, " k"]) -> Float[Array, " k"]:
    return jax.lax.map(
        lambda lam: jnp.mean(exact_loss(sp, ridge_coords(sp, lam + 0 * sp.yq))), lams
    )


@jax.jit
def _tuned_scores(
    sp: Spectral, cs: Float[Array, " k"], maxes: Float[Array, " k"]
) -> Float[Array, " k"]:
    ada = sp.rss / (sp.n - sp.e.shape[-1])

    def one(cm):
        return jnp.mean(exact_loss(sp, ridge_coords(sp, jnp.minimum(cm[0] * ada, cm[1]))))

    return jax.lax.map(one, jnp.stack([cs, maxes], axis=-1))


@eqx.filter_jit
def _gd_scores(sp: Spectral, etas: Float[Array, " k"], steps: int) -> Float[Array, " k"]:
    return jax.lax.map(lambda eta: jnp.mean(exact_loss(sp, gd_coords(sp, eta, steps))), etas)


def tune_baselines(sp: Spectral, gd_steps: int) -> TunedBaselines:
    """Fit ConstRR's λ, TunedRR's (multiplier, threshold) and GD's step size to minimize the
    exact adjusted loss on the tuning sequences `sp` (grid search, then a finer grid)."""
    dt = sp.e.dtype

    def arr(g):
        return jnp.asarray(np.asarray(g, np.float64), dt)

    lam_grid = np.concatenate([[0.0], np.logspace(-4, 3, 141)])
    const_lambda = _refine(lambda g: _finite(_const_scores(sp, arr(g))), lam_grid)

    tuned_c, tuned_max = 1.0, np.inf
    if sp.n > sp.e.shape[-1]:
        c_grid = np.logspace(-1.5, 1.0, 51)
        max_grid = np.concatenate([np.logspace(-2, 3, 61), [np.inf]])
        cc, mm = np.meshgrid(c_grid, max_grid, indexing="ij")
        scores = _finite(_tuned_scores(sp, arr(cc.ravel()), arr(mm.ravel()))).reshape(cc.shape)
        ci, mi = np.unravel_index(np.argmin(scores), scores.shape)
        tuned_max = float(max_grid[mi])
        tuned_c = _refine(
            lambda g: _finite(_tuned_scores(sp, arr(g), arr(np.full_like(g, tuned_max)))), c_grid
        )
        if np.isfinite(tuned_max):
            tuned_max = _refine(
                lambda g: _finite(_tuned_scores(sp, arr(np.full_like(g, tuned_c)), arr(g))),
                max_grid[:-1],
            )

    eta_grid = np.logspace(-4, 0, 161) / max(sp.n, 1)
    gd_eta = _refine(lambda g: _finite(_gd_scores(sp, arr(g), gd_steps)), eta_grid)
    return TunedBaselines(
        const_lambda=const_lambda,
        tuned_c=tuned_c,
        tuned_max=tuned_max,
        gd_steps=gd_steps,
        gd_eta=gd_eta,
    )


def _finite(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(v), v, np.inf)
