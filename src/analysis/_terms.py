"""Theorem 4.1 terms by the recursion of SPEC §6, and the Lemma 4.4 momentum view.

Everything here is a function of one sequence (x, y) and a model; vmap it over a batch.
The recursion never looks at the model's forward pass: each layer's context statistics
S^l = Σ_j e_j^l e_j^lᵀ are rebuilt from (M^l, u^l, w^l, a^l) and the raw statistics
Σ, α, λ of the data, and the layer acts only through its operator T = Σ_k P_k S Q_k.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import eqicl


class Terms(eqx.Module):
    """Theorem 4.1 terms of one sequence, before the first layer (index 0) and after each.

    Every token after layer l is x_i^l = M^l x_i + y_i u^l, y_i^l = a^l y_i − <w^l, x_i>,
    and every query is x_t^l = M^l x_t, y_t^l = −<w^l, x_t>, so the prediction is <w^l, x_t>.
    `stats[l]` is S^l, the context statistics layer l + 1 sees, and `operator[l]` is its
    T^l = [[A, b], [cᵀ, δ]] (paper units).
    """

    M: Float[Array, "layers_plus_1 d d"]
    u: Float[Array, "layers_plus_1 d"]
    w: Float[Array, "layers_plus_1 d"]
    a: Float[Array, " layers_plus_1"]
    stats: Float[Array, "layers D D"]
    operator: Float[Array, "layers D D"]


def token_statistics(
    M: Float[Array, "d d"],
    u: Float[Array, " d"],
    w: Float[Array, " d"],
    a: Float[Array, ""],
    sigma: Float[Array, "d d"],
    alpha: Float[Array, " d"],
    lam: Float[Array, ""],
) -> Float[Array, "D D"]:
    """S^l = Σ_i e_i^l e_i^lᵀ from the terms and the data statistics Σ, α, λ alone.

    Σ^l = MΣMᵀ + Mαuᵀ + uαᵀMᵀ + λuuᵀ,  α^l = M(aα − Σw) + u(aλ − <α, w>),
    λ^l = a²λ − 2a<w, α> + wᵀΣw (expand the sums of Theorem 4.1's token form).
    """
    sxx = (
        M @ sigma @ M.T + jnp.outer(M @ alpha, u) + jnp.outer(u, M @ alpha) + lam * jnp.outer(u, u)
    )
    sxy = M @ (a * alpha - sigma @ w) + u * (a * lam - alpha @ w)
    syy = a * a * lam - 2 * a * (w @ alpha) + w @ sigma @ w
    top = jnp.concatenate([sxx, sxy[:, None]], axis=1)
    bottom = jnp.concatenate([sxy, syy[None]])[None, :]
    return jnp.concatenate([top, bottom], axis=0)


@eqx.filter_jit
def theorem41_terms(
    model: eqicl.LinearTransformer, x: Float[Array, "n d"], y: Float[Array, " n"]
) -> Terms:
    """M^l, u^l, w^l, a^l for l = 0..L by the recursion of SPEC §6:

    M^{l+1} = (I + A) M^l − b (w^l)ᵀ,   u^{l+1} = (I + A) u^l + a^l b,
    a^{l+1} = (1 + δ) a^l + <c, u^l>,   w^{l+1} = (1 + δ) w^l − (M^l)ᵀ c,

    with [[A, b], [cᵀ, δ]] = layer.operator(S^l) and S^l from `token_statistics`. A layer
    class whose `__call__` is its own is refused (`eqicl.UnknownLayer`): the recursion reads
    the layer only through its operator.
    """
    eqicl.require_statistics(model, "theorem41_terms (the Theorem 4.1 recursion)")
    d = x.shape[1]
    sigma, alpha, lam = eqicl.statistics(x, y)
    eye = jnp.eye(d, dtype=x.dtype)
    dynamic, static = eqx.partition(model.layers, eqx.is_array)

    def step(carry, dyn):
        M, u, w, a = carry
        s = token_statistics(M, u, w, a, sigma, alpha, lam)
        t = eqx.combine(dyn, static).operator(s)
        A, b, c, delta = t[:d, :d], t[:d, d], t[d, :d], t[d, d]
        new = (
            (eye + A) @ M - jnp.outer(b, w),
            (eye + A) @ u + a * b,
            (1 + delta) * w - M.T @ c,
            (1 + delta) * a + c @ u,
        )
        return new, (new, s, t)

    zero = jnp.zeros((d,), x.dtype)
    init = (eye, zero, zero, jnp.ones((), x.dtype))
    _, (after, stats, ops) = jax.lax.scan(step, init, dynamic)
    M, u, w, a = (jnp.concatenate([i[None], r], axis=0) for i, r in zip(init, after, strict=True))
    return Terms(M=M, u=u, w=w, a=a, stats=stats, operator=ops)


@eqx.filter_jit
def reconstruct_tokens(
    terms: Terms, x: Float[Array, "n d"], y: Float[Array, " n"], xq: Float[Array, "m d"]
) -> Float[Array, "layers_plus_1 n_plus_m D"]:
    """Every token after every layer as Theorem 4.1 writes it, in the layout of
    `LinearTransformer.tokens` (context first, then queries)."""
    xc = jnp.einsum("lij,nj->lni", terms.M, x) + y[None, :, None] * terms.u[:, None, :]
    yc = terms.a[:, None] * y[None, :] - jnp.einsum("li,ni->ln", terms.w, x)
    xt = jnp.einsum("lij,mj->lmi", terms.M, xq)
    yt = -jnp.einsum("li,mi->lm", terms.w, xq)
    ctx = jnp.concatenate([xc, yc[..., None]], axis=-1)
    qry = jnp.concatenate([xt, yt[..., None]], axis=-1)
    return jnp.concatenate([ctx, qry], axis=1)


class Momentum(eqx.Module):
    """Lemma 4.4 (DIAG, GD++) for one sequence, layer l = 0..L−1 (SPEC §6):

    u^{l+1} = (I − Λ^l) u^l + Γ^l g^l,   w^{l+1} = (1 + s^l) w^l − Π^l g^l − Φ^l u^l,

    where g^l = Σ(a^l w* − w^l) is the gradient of f(w) = Σ_i (a^l y_i − <w, x_i>)² (up to a
    factor −2), w* = Σ⁺α and ρ = RSS. `u_next`, `w_next` are those right-hand sides, to be
    compared with the recursion's u^{l+1}, w^{l+1}.
    """

    Lambda: Float[Array, "layers d d"]
    Gamma: Float[Array, "layers d d"]
    s: Float[Array, " layers"]
    Pi: Float[Array, "layers d d"]
    Phi: Float[Array, "layers d d"]
    gradient: Float[Array, "layers d"]
    w_star: Float[Array, " d"]
    rho: Float[Array, ""]
    u_next: Float[Array, "layers d"]
    w_next: Float[Array, "layers d"]


def rss(
    x: Float[Array, "n d"], y: Float[Array, " n"]
) -> tuple[Float[Array, " d"], Float[Array, ""]]:
    """(w*, ρ): the least-squares weights Σ⁺α (minimum norm when Σ is singular) and the
    residual sum of squares ρ = λ − <α, w*>."""
    sigma, alpha, lam = eqicl.statistics(x, y)
    # pinv, not solve: with n <= d, Σ is singular but α lies in its range, so the identities
    # α = Σw* and λ = ρ + w*ᵀΣw* that Lemma 4.4 rests on still hold.
    w_star = jnp.linalg.pinv(sigma, hermitian=True) @ alpha
    return w_star, lam - alpha @ w_star


@eqx.filter_jit
def momentum_view(
    coefficients: Float[Array, "layers 4"],
    terms: Terms,
    x: Float[Array, "n d"],
    y: Float[Array, " n"],
) -> Momentum:
    """Λ, Γ, s, Π, Φ of Lemma 4.4 from a DIAG / GD++ model's `coefficients()` (paper units)
    and the sequence's Theorem 4.1 terms."""
    d = x.shape[1]
    sigma, _, _ = eqicl.statistics(x, y)
    w_star, rho = rss(x, y)
    eye = jnp.eye(d, dtype=x.dtype)

    def one(coef, M, u, w, a, s_l):
        wxx, wxy, wyx, wyy = coef
        grad = sigma @ (a * w_star - w)
        mw = M + jnp.outer(u, w_star)
        Lambda = -wxy * a * a * rho * eye - wxx * s_l[:d, :d]
        Gamma = a * wxy * mw
        s = wyy * s_l[d, d]
        Pi = wyx * M.T @ mw
        Phi = a * rho * wyx * M.T
        u_next = (eye - Lambda) @ u + Gamma @ grad
        w_next = (1 + s) * w - Pi @ grad - Phi @ u
        return Lambda, Gamma, s, Pi, Phi, grad, u_next, w_next

    Lambda, Gamma, s, Pi, Phi, grad, u_next, w_next = jax.vmap(one)(
        coefficients, terms.M[:-1], terms.u[:-1], terms.w[:-1], terms.a[:-1], terms.stats
    )
    return Momentum(
        Lambda=Lambda,
        Gamma=Gamma,
        s=s,
        Pi=Pi,
        Phi=Phi,
        gradient=grad,
        w_star=w_star,
        rho=rho,
        u_next=u_next,
        w_next=w_next,
    )
