"""The paper's Theorems 5.1 and 5.2 as hand-set weights (SPEC §6), with their closed forms.

A model's weights cannot depend on the sequence, so every construction here fixes its
constants from a property of the task, not of one context:

- Theorem 5.1 (GD++ with preconditioning). Layer l < K is x ← (I − γ_l Σ^l) x (w_xx = −γ_l,
  nothing else); layer K is one gradient step y ← y − η <α^K, x> (w_yx = −η). The theorem's
  γ = 1/(3 λ_max(Σ^l)) is a per-sequence quantity; the construction replaces λ_max(Σ^0) by a
  bound `lam_cover` (the spectra it covers are those with λ_max(XᵀX) ≤ lam_cover) and
  propagates the bound through the layers: on [0, Λ_l] the map e ↦ e (1 − e/(3Λ_l))² is
  increasing with top value (4/9) Λ_l, so Λ_{l+1} = (4/9) Λ_l, γ_l = 1/(3 Λ_l) and
  η = 1/Λ_K. In units of the bound, τ_l = e_l/Λ_l, every eigenvalue follows
  τ_{l+1} = g(τ_l), g(τ) = (9/4) τ (1 − τ/3)²; g(1) = 1 with g'(1) = 0, so 1 − τ converges
  quadratically (1 − g(1 − δ) = (3/4) δ² + δ³/4): the second-order rate. The implicit weights
  are w^K = η M_K² α with M_K = Π_l (I − γ_l Σ^l), i.e. w^K = Σ_i g^K(e_i/Λ_0) (v_iᵀα/e_i) v_i:
  OLS shrunk by g^K per eigen-direction. Outside the bound: g folds (1, 3] back into [0, 1)
  (τ near 3 lands near 0, which is then slow), (3, 5) into (0, 5), and τ > 5 grows cubically.

- Theorem 5.2 (two noise levels, two layers). Layer 1 is one gradient step (w_yx = −η),
  layer 2 a rescaling (w_yy = ω): y¹ = y − η X α, λ¹ = ‖y¹‖², and the prediction is
  ŷ = η (1 + ω λ¹) <α, x_t>, a multiple of α that depends on the residual energy λ¹. For
  x ~ N(0, I) ridge is (Σ + σ²I)⁻¹α ≈ α/(n + σ²) when n is large, and E[λ¹ | σ] = A(η) + B(η)σ²
  exactly (`residual_moments`, from the Wishart moments of Σ), so (η, ω) are set to make the
  expected factor η (1 + ω E[λ¹ | σ_k]) equal 1/(n + σ_k²) at both levels.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ._model import DiagAttention, GDPPAttention, LinearTransformer


def _stack(layers: list) -> LinearTransformer:
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    return LinearTransformer(layers=stacked, num_layers=len(layers))


def gdpp_transformer(coefficients, d: int, dtype=jnp.float64) -> LinearTransformer:
    """A single-head GD++ model whose layer l has (w_xx, w_yx) = `coefficients[l]` in paper
    units (P = diag(w_xx I, w_yx), Q = diag(I, 0))."""
    c = np.asarray(coefficients, np.float64)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"GD++ coefficients must be (layers, 2), got shape {c.shape}")
    layers = [
        GDPPAttention(p=jnp.asarray([[wxx, wyx]], dtype), q_x=jnp.asarray([1.0], dtype), dim=d)
        for wxx, wyx in c
    ]
    return _stack(layers)


def diag_transformer(coefficients, d: int, dtype=jnp.float64) -> LinearTransformer:
    """A single-head DIAG model whose layer l has (w_xx, w_xy, w_yx, w_yy) = `coefficients[l]`
    in paper units. One head needs [[w_xx, w_xy], [w_yx, w_yy]] = (p_x, p_y)ᵀ(q_x, q_y) of rank
    at most one (w_xx w_yy = w_xy w_yx, SPEC §2); it is factored exactly by its SVD."""
    c = np.asarray(coefficients, np.float64)
    if c.ndim != 2 or c.shape[1] != 4:
        raise ValueError(f"DIAG coefficients must be (layers, 4), got shape {c.shape}")
    layers = []
    for row in c:
        w = row.reshape(2, 2)
        u, s, vt = np.linalg.svd(w)
        if s[1] > 1e-12 * max(s[0], 1e-300):
            raise ValueError(
                f"one head cannot hold coefficients {row.tolist()}: w_xx w_yy != w_xy w_yx"
            )
        p, q = u[:, 0] * s[0], vt[0]
        layers.append(
            DiagAttention(p=jnp.asarray(p[None], dtype), q=jnp.asarray(q[None], dtype), dim=d)
        )
    return _stack(layers)


# --------------------------------------------------------------------------------------------
# Theorem 5.1


@dataclasses.dataclass(frozen=True)
class Preconditioned:
    """Theorem 5.1's constants: `gammas[l]` = γ_l of preconditioning layer l, `eta` the final
    GD step, `bounds[l]` = Λ_l (the bound on λ_max(Σ^l) the construction assumes)."""

    gammas: np.ndarray
    eta: float
    bounds: np.ndarray

    @property
    def coefficients(self) -> np.ndarray:
        """(w_xx, w_yx) of every layer: K preconditioning layers, then the GD step."""
        pre = np.stack([-self.gammas, np.zeros_like(self.gammas)], axis=1)
        return np.concatenate([pre, [[0.0, -self.eta]]], axis=0)


def theorem51(lam_cover: float, steps: int) -> Preconditioned:
    """Constants of `steps` preconditioning layers and the final GD step for the spectra with
    λ_max(XᵀX) ≤ `lam_cover` (see the module docstring)."""
    if not lam_cover > 0 or steps < 0:
        raise ValueError(f"need lam_cover > 0 and steps >= 0, got {lam_cover}, {steps}")
    bounds = lam_cover * (4.0 / 9.0) ** np.arange(steps + 1)
    return Preconditioned(gammas=1.0 / (3.0 * bounds[:-1]), eta=1.0 / bounds[-1], bounds=bounds)


def theorem51_transformer(lam_cover: float, steps: int, d: int, dtype=jnp.float64):
    """The GD++ model of Theorem 5.1: `steps` preconditioning layers and one GD layer."""
    return gdpp_transformer(theorem51(lam_cover, steps).coefficients, d, dtype)


def theorem51_map(tau):
    """g(τ) = (9/4) τ (1 − τ/3)²: one preconditioning layer on an eigenvalue in units of the
    layer's bound."""
    return 2.25 * tau * (1.0 - tau / 3.0) ** 2


def theorem51_shrinkage(e, lam_cover: float, steps: int):
    """g^K(e/Λ_0): the factor by which the construction's w^K shrinks OLS along an eigenvector
    of Σ with eigenvalue `e` (any array shape; numpy, float64)."""
    tau = np.asarray(e, np.float64) / lam_cover
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(steps):
            tau = theorem51_map(tau)
    return tau


def theorem51_weights(sigma, alpha, lam_cover: float, steps: int) -> np.ndarray:
    """w^K = η M_K² α computed as a matrix polynomial of Σ (not through eigenvalues):
    M ← (I − γ_l Σ_l) M and Σ_{l+1} = (I − γ_l Σ_l) Σ_l (I − γ_l Σ_l) for each layer."""
    sigma, alpha = np.asarray(sigma, np.float64), np.asarray(alpha, np.float64)
    c = theorem51(lam_cover, steps)
    eye = np.eye(sigma.shape[-1])
    m, s = eye, sigma
    for g in c.gammas:
        step = eye - g * s
        m, s = step @ m, step @ s @ step
    return c.eta * m @ m @ alpha


# --------------------------------------------------------------------------------------------
# Theorem 5.2


def wishart_trace_moments(n: int, d: int) -> tuple[float, float, float]:
    """E tr Σ, E tr Σ², E tr Σ³ for Σ = XᵀX, X an n×d matrix of independent N(0, 1)
    (Σ ~ Wishart_d(n, I))."""
    return (
        float(n * d),
        float(n * d * (n + d + 1)),
        float(n * d * (n * n + d * d + 3 * n * d + 3 * n + 3 * d + 4)),
    )


def residual_moments(n: int, d: int, eta: float) -> tuple[float, float]:
    """(A, B) with E[λ¹ | σ] = A + B σ², λ¹ = ‖(I − η XXᵀ) y‖², for w ~ N(0, I), x ~ N(0, I):
    E[y yᵀ | X] = XXᵀ + σ²I gives A = E tr(Σ − 2ηΣ² + η²Σ³), B = n − 2η E tr Σ + η² E tr Σ²."""
    t1, t2, t3 = wishart_trace_moments(n, d)
    return t1 - 2 * eta * t2 + eta**2 * t3, n - 2 * eta * t1 + eta**2 * t2


@dataclasses.dataclass(frozen=True)
class TwoLevel:
    """Theorem 5.2's constants: layer 1 w_yx = −eta, layer 2 w_yy = omega."""

    eta: float
    omega: float

    @property
    def coefficients(self) -> np.ndarray:
        """(w_xx, w_xy, w_yx, w_yy) of the two layers."""
        return np.array([[0.0, 0.0, -self.eta, 0.0], [0.0, 0.0, 0.0, self.omega]])


def theorem52(n: int, d: int, sigma1: float, sigma2: float) -> TwoLevel:
    """(η, ω) such that E[η (1 + ω λ¹) | σ_k] = 1/(n + σ_k²) for k = 1, 2.

    The factor is linear in σ² (`residual_moments`): slope ηωB(η) = s and intercept
    η + ηωA(η) = i, with s, i the line through the two targets. Eliminating ω leaves the cubic
    η B(η) + s A(η) − i B(η) = 0; the root nearest the one-step size 1/n is taken, and none
    within 50 % of it (small n: for d = 10, σ ∈ {1, 3} there is none at n = 20) is an error."""
    if sigma1 == sigma2:
        raise ValueError("Theorem 5.2 needs two different noise levels")
    a, b = n + sigma1**2, n + sigma2**2
    slope, intercept = -1.0 / (a * b), (n + sigma1**2 + sigma2**2) / (a * b)
    t1, t2, t3 = wishart_trace_moments(n, d)
    # A(η) = t1 − 2 t2 η + t3 η², B(η) = n − 2 t1 η + t2 η² as polynomials (highest power first).
    poly_a, poly_b = np.array([t3, -2 * t2, t1]), np.array([t2, -2 * t1, float(n)])
    cubic = np.polyadd(
        np.polymul([1.0, 0.0], poly_b), np.polysub(slope * poly_a, intercept * poly_b)
    )
    roots = np.roots(cubic)
    real = roots[np.abs(roots.imag) < 1e-9 * np.abs(roots)].real
    real = real[(np.polyval(poly_b, real) > 0) & (np.abs(real * n - 1.0) < 0.5)]
    if real.size == 0:
        raise ValueError(
            f"no two-layer construction for sigma = {sigma1}, {sigma2} at n = {n}, d = {d}: "
            "the cubic has no real root within 50 % of the step 1/n (n too small)"
        )
    eta = float(real[np.argmin(np.abs(real * n - 1.0))])
    return TwoLevel(eta=eta, omega=slope / (eta * float(np.polyval(poly_b, eta))))


def theorem52_transformer(n: int, d: int, sigma1: float, sigma2: float, dtype=jnp.float64):
    """The two-layer DIAG model of Theorem 5.2 for noise levels σ1, σ2 at context length n."""
    return diag_transformer(theorem52(n, d, sigma1, sigma2).coefficients, d, dtype)


def theorem52_weights(sigma, alpha, lam: float, eta: float, omega: float) -> np.ndarray:
    """w² = η (1 + ω λ¹) α with λ¹ = λ − 2η αᵀα + η² αᵀΣα, from the statistics alone."""
    sigma, alpha = np.asarray(sigma, np.float64), np.asarray(alpha, np.float64)
    lam1 = lam - 2 * eta * alpha @ alpha + eta**2 * alpha @ sigma @ alpha
    return eta * (1.0 + omega * lam1) * alpha
