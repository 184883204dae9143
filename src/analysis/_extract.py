"""Which algorithm did the transformer learn? Summaries of the Theorem 4.1 terms, the
implicit regression weights, the DIAG coefficients (or FULL block statistics) and the
Lemma 4.4 momentum view, on a model and a batch (no run directory needed).

Batch-level functions return plain dicts of Python floats and lists, ready for JSON.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

import eqicl
from eqicl import mean_se

from ._terms import Momentum, Terms, momentum_view, reconstruct_tokens, rss, theorem41_terms

# λ values for "ridge with other λ" (0 is OLS, minimum-norm when Σ is singular).
LAMBDAS = np.concatenate([[0.0], np.logspace(-3, 3, 61)])


def _range(values) -> list[float]:
    v = np.asarray(values, np.float64)
    return [float(v.min()), float(v.max())]


@eqx.filter_jit
def batch_terms(
    model: eqicl.LinearTransformer, x: Float[Array, "batch n d"], y: Float[Array, "batch n"]
) -> Terms:
    """`theorem41_terms` of every sequence of a batch (leading batch axis on every field)."""
    return jax.vmap(theorem41_terms, in_axes=(None, 0, 0))(model, x, y)


@eqx.filter_jit
def _token_errors(model, terms, x, y, xq):
    def one(t, x1, y1, q1):
        want = model.tokens(x1, y1, q1[None])
        got = reconstruct_tokens(t, x1, y1, q1[None])
        err = jnp.max(jnp.abs(got - want), axis=(1, 2))
        return err, jnp.max(jnp.abs(want), axis=(1, 2))

    return jax.vmap(one)(terms, x, y, xq)


def reconstruction_error(
    model: eqicl.LinearTransformer, batch: eqicl.Batch, terms: Terms | None = None
) -> dict:
    """Largest |token from Theorem 4.1 terms − token of the forward pass| over the batch,
    absolute and relative to the largest token, before the first and after every layer."""
    if terms is None:
        terms = batch_terms(model, batch.x, batch.y)
    err, size = (np.asarray(v) for v in _token_errors(model, terms, batch.x, batch.y, batch.xq))
    rel = err / np.maximum(size, np.finfo(err.dtype).tiny)
    return {
        "max_abs": float(err.max()),
        "max_rel": float(rel.max()),
        "per_layer_max_abs": err.max(axis=0).tolist(),
        "per_layer_max_rel": rel.max(axis=0).tolist(),
        "dtype": str(err.dtype),
    }


def coefficients(model: eqicl.LinearTransformer) -> Float[Array, "layers 4"]:
    """(w_xx, w_xy, w_yx, w_yy) of every layer in paper units: exact for DIAG / GD++, and for
    FULL the same four statistics read off P and Q (`block_statistics`)."""
    if isinstance(model.layers, eqicl.AbstractDiagAttention):
        return model.coefficients()
    return block_statistics(model)


def block_statistics(model: eqicl.LinearTransformer) -> Float[Array, "layers 4"]:
    """Σ_k p_x q_x, Σ_k p_x q_y, Σ_k p_y q_x, Σ_k p_y q_y with p_x, q_x the mean diagonal of
    the x-blocks of P_k, Q_k and p_y, q_y their (y, y) entries: the DIAG coefficients of the
    diagonal part of any model (equal to `coefficients()` for DIAG and GD++)."""
    p, q = model.pq()
    d = p.shape[-1] - 1
    px = jnp.trace(p[..., :d, :d], axis1=-2, axis2=-1) / d
    qx = jnp.trace(q[..., :d, :d], axis1=-2, axis2=-1) / d
    py, qy = p[..., d, d], q[..., d, d]
    return jnp.stack(
        [
            jnp.sum(px * qx, axis=-1),
            jnp.sum(px * qy, axis=-1),
            jnp.sum(py * qx, axis=-1),
            jnp.sum(py * qy, axis=-1),
        ],
        axis=-1,
    )


def matrix_structure(m: np.ndarray) -> dict:
    """How diagonal-heavy a D×D matrix is and the rank of what is left.

    The diagonal part is diag(c I_d, m_yy), c the mean of the x-block diagonal (the DIAG
    structure); `diagonal_fraction` is its share of ‖m‖_F², `rest_rank_99` the number of
    singular values of m minus that part holding 99% of its energy, `rest_stable_rank`
    ‖rest‖_F² / ‖rest‖_2².
    """
    m = np.asarray(m, np.float64)
    d = m.shape[0] - 1
    part = np.diag(np.r_[np.full(d, np.trace(m[:d, :d]) / d), m[d, d]])
    rest = m - part
    total = float(np.sum(m**2))
    sv = np.linalg.svd(rest, compute_uv=False)
    energy = np.cumsum(sv**2) / max(float(np.sum(sv**2)), np.finfo(np.float64).tiny)
    return {
        "x_diagonal_mean": float(part[0, 0]) if d else 0.0,
        "yy": float(m[d, d]),
        "diagonal_fraction": float(np.sum(part**2) / total) if total > 0 else None,
        "rest_norm": float(np.sqrt(np.sum(rest**2))),
        "rest_rank_99": int(np.searchsorted(energy, 0.99) + 1) if sv[0] > 0 else 0,
        "rest_stable_rank": float(np.sum(sv**2) / sv[0] ** 2) if sv[0] > 0 else 0.0,
        "rest_singular_values": sv[: min(4, sv.size)].tolist(),
    }


def full_structure(model: eqicl.LinearTransformer) -> list[list[dict]]:
    """`matrix_structure` of P_k and Q_k (paper units) for every layer and head."""
    p, q = (np.asarray(v) for v in model.pq())
    return [
        [
            {"P": matrix_structure(p[j, k]), "Q": matrix_structure(q[j, k])}
            for k in range(p.shape[1])
        ]
        for j in range(p.shape[0])
    ]


@jax.jit
def _ridge_distances(e, a, wc, lams):
    """½‖w − (Σ + λI)⁻¹α‖² for every λ (rows), sequence and layer, in eigen-coordinates;
    λ = 0 is the minimum-norm least-squares solution."""

    def one(lam):
        denom = e + lam
        target = jnp.where(denom > 1e-12, a / jnp.where(denom > 1e-12, denom, 1.0), 0.0)
        return 0.5 * jnp.sum((wc - target[:, None, :]) ** 2, axis=-1)

    return jax.lax.map(one, lams)


def weight_distances(
    terms: Terms, batch: eqicl.Batch, lambdas: Sequence[float] | np.ndarray = LAMBDAS
) -> dict:
    """How close the implicit weights w^l are to closed-form regressions, layer by layer
    (l = 0 is w = 0, before the first layer): mean ½‖w^l − μ‖² to the oracle ridge
    μ = (Σ + σ_τ²I)⁻¹α (the exact adjusted loss after l layers, SPEC §5), to OLS (λ = 0) and
    to ridge with every λ in `lambdas`, and the λ that fits w^l best. `ridge_loss` is each
    ridge solution's own adjusted loss on the batch and `best_constant_*` the best single λ
    (ConstRR tuned on these very sequences, so slightly optimistic)."""
    sp = eqicl.spectral(batch)
    e, v, a = sp.e, sp.v, sp.a
    wc = jnp.einsum("bji,blj->bli", v, terms.w)
    s2 = (batch.sigma**2)[:, None]
    mu = a / (e + s2)
    oracle = np.asarray(0.5 * jnp.sum((wc - mu[:, None, :]) ** 2, axis=-1))
    lams = jnp.asarray(np.asarray(lambdas, np.float64), e.dtype)
    ridge = np.asarray(_ridge_distances(e, a, wc, lams)).mean(axis=1)  # (lambdas, layers)
    best = ridge.argmin(axis=0)
    lam_list = np.asarray(lambdas, np.float64)
    # The baselines' own adjusted loss ½‖ridge_λ − μ‖² on the same sequences, for reference.
    base = np.asarray(_ridge_distances(e, a, mu[:, None, :], lams))[:, :, 0].mean(axis=1)
    return {
        "oracle": [mean_se(oracle[:, j]) for j in range(oracle.shape[1])],
        "ols": ridge[0].tolist() if lam_list[0] == 0 else None,
        "lambdas": lam_list.tolist(),
        "ridge": ridge.T.tolist(),  # (layers + 1, lambdas)
        "best_lambda": [float(lam_list[i]) for i in best],
        "best_lambda_distance": [float(ridge[i, j]) for j, i in enumerate(best)],
        "ridge_loss": base.tolist(),
        "best_constant_lambda": float(lam_list[int(base.argmin())]),
        "best_constant_loss": float(base.min()),
    }


@eqx.filter_jit
def batch_momentum(
    coef: Float[Array, "layers 4"],
    terms: Terms,
    x: Float[Array, "batch n d"],
    y: Float[Array, "batch n"],
) -> Momentum:
    """`momentum_view` of every sequence of a batch."""
    return jax.vmap(momentum_view, in_axes=(None, 0, 0, 0))(coef, terms, x, y)


@jax.jit
def _momentum_numbers(mo: Momentum, u_now, u_next, w_next):
    lam_eig = jnp.linalg.eigvalsh(mo.Lambda)  # Λ is symmetric: Σ^l is

    def sv(m):
        return jnp.linalg.svd(m, compute_uv=False)

    err_u = jnp.max(jnp.abs(mo.u_next - u_next), axis=-1)
    err_w = jnp.max(jnp.abs(mo.w_next - w_next), axis=-1)
    pull = jnp.linalg.norm(jnp.einsum("blij,blj->bli", mo.Phi, u_now), axis=-1)
    grad = jnp.linalg.norm(jnp.einsum("blij,blj->bli", mo.Pi, mo.gradient), axis=-1)
    share = pull / jnp.maximum(pull + grad, jnp.finfo(pull.dtype).tiny)
    return lam_eig, sv(mo.Gamma), sv(mo.Pi), sv(mo.Phi), err_u, err_w, share


def momentum_summary(model: eqicl.LinearTransformer, batch: eqicl.Batch, terms: Terms) -> dict:
    """Lemma 4.4 on a batch (DIAG and GD++): the identity's largest residual, and per layer the
    eigenvalue range of Λ (so of the momentum decay I − Λ), the singular-value ranges of Γ, Π
    and Φ, the range of s, and the share of the w-update that comes from the buffer u,
    ‖Φu‖ / (‖Φu‖ + ‖ΠΣg‖): where it is large, u acts as a momentum buffer."""
    mo = batch_momentum(model.coefficients(), terms, batch.x, batch.y)
    lam_eig, g_sv, p_sv, f_sv, err_u, err_w, share = (
        np.asarray(v)
        for v in _momentum_numbers(mo, terms.u[:, :-1], terms.u[:, 1:], terms.w[:, 1:])
    )
    layers = []
    for j in range(lam_eig.shape[1]):
        layers.append(
            {
                "layer": j + 1,
                "Lambda_eigenvalues": _range(lam_eig[:, j]),
                "momentum_decay_eigenvalues": _range(1 - lam_eig[:, j]),
                "Gamma_singular_values": _range(g_sv[:, j]),
                "Pi_singular_values": _range(p_sv[:, j]),
                "Phi_singular_values": _range(f_sv[:, j]),
                "s": _range(np.asarray(mo.s)[:, j]),
                "momentum_share": mean_se(share[:, j]),
                "identity_max_abs_u": float(err_u[:, j].max()),
                "identity_max_abs_w": float(err_w[:, j].max()),
            }
        )
    scale = max(
        float(np.max(np.abs(np.asarray(terms.w)))), float(np.max(np.abs(np.asarray(terms.u)))), 1.0
    )
    return {
        "identity_max_abs": float(max(err_u.max(), err_w.max())),
        "identity_max_rel": float(max(err_u.max(), err_w.max()) / scale),
        "rho": mean_se(np.asarray(mo.rho)),
        "layers": layers,
    }


@eqx.filter_jit
def _noise_numbers(coef, terms: Terms, x, y):
    _, rho = jax.vmap(rss)(x, y)
    step = coef[None, :, 2] * (1 + coef[None, :, 1] * rho[:, None])
    d = x.shape[-1]
    # 1 + δ^l multiplies w^l and a^l (Theorem 4.1); for DIAG δ^l = w_yy λ^l exactly.
    rescale = 1 + terms.operator[:, :, d, d]
    return rho, step, rescale


def noise_adaptation(model: eqicl.LinearTransformer, batch: eqicl.Batch, terms: Terms) -> dict:
    """Per layer: the effective gradient step w_yx(1 + w_xy ρ) (ρ = RSS; negative is a descent
    step; w_xy < 0 shrinks it as the noise grows) and the rescaling 1 + δ^l (= 1 + w_yy λ^l for
    DIAG), as batch means. For FULL the step uses the block statistics of P and Q.

    The step is SPEC §6's per-layer summary. Exactly, the w_xy of one layer builds the buffer u
    (Lemma 4.4) whose a ρ u term enters the next layer's α^l, so it shifts the following
    layers' steps; the best-fitting ridge λ of `weight_distances` is the exact account."""
    rho, step, rescale = (
        np.asarray(v) for v in _noise_numbers(coefficients(model), terms, batch.x, batch.y)
    )
    return {
        "rho": mean_se(rho),
        "effective_step": [mean_se(step[:, j]) for j in range(step.shape[1])],
        "rescaling": [mean_se(rescale[:, j]) for j in range(rescale.shape[1])],
    }


def terms_summary(terms: Terms) -> list[dict]:
    """Batch means of the size of each Theorem 4.1 term, l = 0..L."""
    M, u, w, a = (np.asarray(v) for v in (terms.M, terms.u, terms.w, terms.a))
    eye = np.eye(M.shape[-1])
    return [
        {
            "layer": j,
            "M_minus_I_norm": mean_se(np.linalg.norm(M[:, j] - eye, axis=(-2, -1))),
            "u_norm": mean_se(np.linalg.norm(u[:, j], axis=-1)),
            "w_norm": mean_se(np.linalg.norm(w[:, j], axis=-1)),
            "a": mean_se(a[:, j]),
        }
        for j in range(M.shape[1])
    ]


def analyse(model: eqicl.LinearTransformer, batch: eqicl.Batch) -> dict:
    """Everything `python -m analysis.extract` writes for one batch, as a JSON-ready dict:
    the reconstruction error of the Theorem 4.1 terms, their sizes, the distances of w^l to
    ridge solutions, the coefficients (DIAG / GD++) or block statistics and structure (FULL),
    the noise adaptation, and the Lemma 4.4 momentum view (DIAG / GD++)."""
    diag = isinstance(model.layers, eqicl.AbstractDiagAttention)
    terms = batch_terms(model, batch.x, batch.y)
    p, q = model.pq()
    out = {
        "kind": model.kind,
        "layers": model.num_layers,
        "heads": int(p.shape[1]),
        "sequences": int(batch.x.shape[0]),
        "reconstruction": reconstruction_error(model, batch, terms),
        "terms": terms_summary(terms),
        "terms_first_sequence": {
            name: np.asarray(getattr(terms, name)[0]).tolist() for name in ("M", "u", "w", "a")
        },
        "weights": weight_distances(terms, batch),
        "coefficients": {
            "names": ["w_xx", "w_xy", "w_yx", "w_yy"],
            "source": "model" if diag else "P, Q diagonal parts (block statistics)",
            "values": np.asarray(coefficients(model)).tolist(),
        },
        "noise": noise_adaptation(model, batch, terms),
        "P": np.asarray(p).tolist(),
        "Q": np.asarray(q).tolist(),
    }
    if diag:
        out["momentum"] = momentum_summary(model, batch, terms)
    else:
        out["structure"] = full_structure(model)
    return out


def per_sigma(
    model: eqicl.LinearTransformer,
    task: eqicl.TaskConfig,
    key: PRNGKeyArray,
    sigmas: Sequence[float],
    sequences: int,
) -> dict:
    """The per-variance view: at each fixed σ, `sequences` fresh sequences of `task`; per layer
    the exact adjusted loss ½‖w^l − μ‖², the best-fitting ridge λ (compare with σ², the
    oracle's), the effective step size and the rescaling factor."""
    dt = model.pq()[0].dtype
    out: dict = {
        "sigma": [float(s) for s in sigmas],
        "oracle": [],
        "best_lambda": [],
        "effective_step": [],
        "rescaling": [],
        "rho": [],
    }
    for i, s in enumerate(sigmas):
        batch = eqicl.sample_batch(
            jr.fold_in(key, i), task, sequences, dt, sigma=jnp.full((sequences,), s, dt)
        )
        terms = batch_terms(model, batch.x, batch.y)
        dist = weight_distances(terms, batch)
        noise = noise_adaptation(model, batch, terms)
        out["oracle"].append([v["mean"] for v in dist["oracle"]])
        out["best_lambda"].append(dist["best_lambda"])
        out["effective_step"].append([v["mean"] for v in noise["effective_step"]])
        out["rescaling"].append([v["mean"] for v in noise["rescaling"]])
        out["rho"].append(noise["rho"]["mean"])
    return out


def default_sigmas(task: eqicl.TaskConfig, points: int = 7, factor: float = 1.5) -> list[float]:
    """σ grid from 0 to `factor` × the largest training σ (or to 1 for a noiseless task): the
    evaluation's profile grid (`eqicl.profile_sigmas`)."""
    return eqicl.profile_sigmas(task, points, factor).tolist()
