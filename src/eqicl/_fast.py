"""The fast training path: the forward pass on the D×D context statistics (Theorem 4.1),
batch-last, with the data sampled as statistics.

Why this is exact. Every layer multiplies every token by the same matrix, e ← (I + Tˡ) e with
Tˡ = layer.operator(Sˡ), so after l layers the context statistics are
Sˡ⁺¹ = (I + Tˡ) Sˡ (I + Tˡ)ᵀ and the query token is Cᴸ (x_t, 0) with Cᴸ = Π_l (I + Tˡ).
The prediction is ŷ = <wᴸ, x_t> with wᴸ = −(last row of Cᴸ)[:d]. The model therefore sees the
context only through S⁰ = Σ_j e_j e_jᵀ: the step costs O(L·D³) per sequence whatever n is.

Why batch-last. XLA on CPU runs a batch of 11×11 products well only when the batch is the
innermost, vectorised axis and the product is unrolled into D multiply-adds (`_bmm`); it runs
products with a shared parameter matrix (the layer's P S Q) as one large GEMM. Two chained
unrolled products must not be fused into one loop (XLA would recompute the inner product D
times), hence `_materialize`; and their autodiff is poor, hence the hand-written VJP of
`sandwich`.

Why the Wishart sampler is exact. Given w_τ and σ_τ the tokens e_j = (x_j, <w, x_j> + σ ξ_j)
are G z_j with z_j ~ N(0, I_D) and G = [[I, 0], [wᵀ, σ]], so S⁰ = G Z Gᵀ with
Z = Σ_j z_j z_jᵀ ~ Wishart_D(n, I). The CPU kernel draws Z by Bartlett's decomposition (for
n ≥ D: Z = A Aᵀ with A lower triangular, A_ii² ~ χ²_{n−i}, i = 0..D−1, and A_ij ~ N(0, 1)
below the diagonal, all independent), w_τ and the query as standard normals, σ_τ as in
`sample_batch`. The statistics then have exactly the distribution of those of `sample_batch`,
from D(D+1)/2 + 2d random numbers per sequence (plus a few rejected gamma proposals) instead
of n·(d+1) + 2d: the sequences differ, the law does not, and the cost does not grow with n.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from . import _kernel
from ._config import TaskConfig
from ._model import AbstractLinearAttention, LinearTransformer, require_statistics
from ._tail import Proposal
from ._task import Batch, noise_draws, sample_batch, sample_sigma


class Stats(eqx.Module):
    """A batch of sequences seen through their statistics, batch on the last axis.

    `s`: S⁰ = Σ_j e_j e_jᵀ over the n context tokens; `xq`, `yq`: the query and its noiseless
    target; `sigma`: σ_τ of each sequence.
    """

    s: Float[Array, "D D batch"]
    xq: Float[Array, "d batch"]
    yq: Float[Array, " batch"]
    sigma: Float[Array, " batch"]


# ---------------------------------------------------------------------------------------------
# Batched tiny products, batch last.


def _bmm(a: Float[Array, "i j batch"], b: Float[Array, "j k batch"]) -> Float[Array, "i k batch"]:
    """a @ b per sequence, as j unrolled multiply-adds vectorised over the batch."""
    out = a[:, 0, None, :] * b[None, 0, :, :]
    for j in range(1, a.shape[1]):
        out = out + a[:, j, None, :] * b[None, j, :, :]
    return out


def _bmm_nt(
    a: Float[Array, "i j batch"], b: Float[Array, "k j batch"]
) -> Float[Array, "i k batch"]:
    """a @ bᵀ per sequence."""
    out = a[:, 0, None, :] * b[None, :, 0, :]
    for j in range(1, a.shape[1]):
        out = out + a[:, j, None, :] * b[None, :, j, :]
    return out


def _bmm_tn(
    a: Float[Array, "j i batch"], b: Float[Array, "j k batch"]
) -> Float[Array, "i k batch"]:
    """aᵀ @ b per sequence."""
    out = a[0, :, None, :] * b[None, 0, :, :]
    for j in range(1, a.shape[0]):
        out = out + a[j, :, None, :] * b[None, j, :, :]
    return out


def _identity_branch(x):
    return x


def _nan_branch(x):
    return jnp.full_like(x, jnp.nan)


def _cond_identity(x):
    # A conditional on a data-dependent predicate that XLA can neither fold nor merge (its
    # branches differ). The value is x whenever x's first entry is finite; otherwise x holds
    # a non-finite number, the step's loss or gradient is non-finite anyway and the step is
    # skipped, so the NaN branch changes no result.
    return lax.cond(jnp.isfinite(x.ravel()[0]), _identity_branch, _nan_branch, x)


@jax.custom_batching.custom_vmap
def _materialize(x):
    """x, computed into its own buffer. XLA-CPU fuses an elementwise producer into its
    consumer even when the consumer reads every element D times (it would recompute a whole
    product D times) and drops `optimization_barrier`; a conditional boundary stops it."""
    return _cond_identity(x)


@_materialize.def_vmap
def _materialize_vmap(axis_size, in_batched, x):
    # Under vmap (seed ensembles) the predicate would become batched and the conditional a
    # select of both branches, which XLA fuses again: keep one unbatched conditional.
    return _cond_identity(x), in_batched[0]


@jax.custom_vjp
def sandwich(
    a: Float[Array, "D D batch"], s: Float[Array, "D D batch"]
) -> Float[Array, "D D batch"]:
    """A S Aᵀ per sequence (S symmetric)."""
    return _bmm_nt(_materialize(_bmm(a, s)), a)


def _sandwich_fwd(a, s):
    u = _materialize(_bmm(a, s))
    return _bmm_nt(u, a), (a, u)


def _sandwich_bwd(res, g):
    # With S symmetric and any cotangent G: d/dA = (G + Gᵀ) A S, d/dS = Aᵀ G A. Only the
    # symmetric part of the S-cotangent ever matters (S feeds P S Q and the previous
    # sandwich, whose A-gradient symmetrises), so Aᵀ ½(G + Gᵀ) A is returned.
    a, u = res
    gs = _materialize(g + jnp.swapaxes(g, 0, 1))
    a_bar = _bmm(gs, u)
    v = _materialize(_bmm(gs, a))
    s_bar = 0.5 * _bmm_tn(a, v)
    return a_bar, s_bar


sandwich.defvjp(_sandwich_fwd, _sandwich_bwd)


# ---------------------------------------------------------------------------------------------
# The forward pass on statistics.


def _operator(
    layer: AbstractLinearAttention, s: Float[Array, "D D batch"]
) -> Float[Array, "D D batch"]:
    """Tˡ = layer.operator(Sˡ) for every sequence, batch last."""
    # The layer's own operator, vmapped over the batch axis: for FULL, P S Q with shared P, Q
    # becomes GEMMs over all sequences; for DIAG/GD++ an element-wise scaling of S's blocks.
    return jax.vmap(layer.operator, in_axes=2, out_axes=2)(s)


def layer_maps(
    model: LinearTransformer, s: Float[Array, "D D batch"]
) -> Float[Array, "layers D D batch"]:
    """I + Tˡ of every layer, Tˡ = layer.operator(Sˡ), with Sˡ⁺¹ = (I + Tˡ) Sˡ (I + Tˡ)ᵀ."""
    require_statistics(model, "the statistics formulation")
    dynamic, static = eqx.partition(model.layers, eqx.is_array)
    eye = jnp.eye(s.shape[0], dtype=s.dtype)[:, :, None]

    def step(s_l, dyn):
        layer = eqx.combine(dyn, static)
        t = _operator(layer, s_l)
        a = eye + t
        return sandwich(a, s_l), a

    _, maps = lax.scan(step, s, dynamic)
    return maps


@jax.custom_vjp
def _row_times(r: Float[Array, "D batch"], a: Float[Array, "D D batch"]) -> Float[Array, "D batch"]:
    """rᵀ A per sequence, unrolled (XLA-CPU's reduce over a non-minor axis is an order of
    magnitude slower than the same sum written as multiply-adds)."""
    out = r[0, None, :] * a[0]
    for j in range(1, a.shape[0]):
        out = out + r[j, None, :] * a[j]
    return out


def _row_times_fwd(r, a):
    return _row_times(r, a), (r, a)


def _row_times_bwd(res, g):
    # d/dr = A ḡ, d/dA = r ḡᵀ: one outer product instead of autodiff's D padded slices.
    r, a = res
    r_bar = a[:, 0, :] * g[0, None, :]
    for k in range(1, a.shape[1]):
        r_bar = r_bar + a[:, k, :] * g[k, None, :]
    return r_bar, r[:, None, :] * g[None, :, :]


_row_times.defvjp(_row_times_fwd, _row_times_bwd)


def final_weights(
    model: LinearTransformer, s: Float[Array, "D D batch"]
) -> Float[Array, "d batch"]:
    """wᴸ after the last layer: ŷ = <wᴸ, x_t>, wᴸ = −(e_Dᵀ (I+Tᴸ⁻¹) ⋯ (I+T⁰))[:d]. On a
    single CPU device this runs eqicl's compiled kernel (`eqicl._kernel`, same result to
    round-off); elsewhere the XLA formulation below."""
    require_statistics(model, "final_weights (the statistics formulation)")
    if _kernel.usable():
        return _kernel.final_weights(model, s)
    return xla_final_weights(model, s)


def xla_final_weights(
    model: LinearTransformer, s: Float[Array, "D D batch"]
) -> Float[Array, "d batch"]:
    """`final_weights` in XLA (any backend, any mesh)."""
    maps = layer_maps(model, s)
    big_d, batch = s.shape[0], s.shape[-1]
    row = jnp.zeros((big_d, batch), s.dtype).at[-1].set(1.0)
    row, _ = lax.scan(lambda r, a: (_row_times(r, a), None), row, maps, reverse=True)
    return -row[:-1]


def layer_weights(
    model: LinearTransformer, s: Float[Array, "D D batch"]
) -> Float[Array, "layers d batch"]:
    """wˡ after every layer (row l: after layer l + 1), from the cumulative maps Cˡ; the
    compiled kernel where it applies (forward only), as in `final_weights`."""
    require_statistics(model, "layer_weights (the statistics formulation)")
    if _kernel.usable():
        return _kernel.layer_weights(model, s)
    return xla_layer_weights(model, s)


def xla_layer_weights(
    model: LinearTransformer, s: Float[Array, "D D batch"]
) -> Float[Array, "layers d batch"]:
    """`layer_weights` in XLA (any backend, any mesh)."""
    maps = layer_maps(model, s)

    def fwd(c, a):
        c = _bmm(a, c)
        return c, -c[-1, :-1]

    eye = jnp.broadcast_to(jnp.eye(s.shape[0], dtype=s.dtype)[:, :, None], s.shape)
    _, ws = lax.scan(fwd, eye, maps)
    return ws


# ---------------------------------------------------------------------------------------------
# Data as statistics.


def _shard_batch(x):
    """Shard the last (batch) axis over the mesh axis "data" when a mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "data" not in mesh.axis_names:
        return x
    spec = jax.sharding.PartitionSpec(*([None] * (x.ndim - 1)), "data")
    return lax.with_sharding_constraint(x, spec)


def context_stats(
    x: Float[Array, "batch n d"], y: Float[Array, "batch n"]
) -> Float[Array, "D D batch"]:
    """S⁰ = Σ_j e_j e_jᵀ of every sequence, batch last."""
    e = jnp.concatenate([x, y[..., None]], axis=-1)
    return jnp.einsum("bni,bnj->ijb", e, e)


def stats_from_batch(batch: Batch) -> Stats:
    """The statistics of sampled tokens: the same sequences as `batch`."""
    return Stats(s=context_stats(batch.x, batch.y), xq=batch.xq.T, yq=batch.yq, sigma=batch.sigma)


def sample_stats(
    key: PRNGKeyArray, task: TaskConfig, batch: int, dtype=jnp.float32, sampler: str = "wishart"
) -> Stats:
    """`batch` sequences as statistics. `sampler="tokens"`: from `sample_batch` (the same
    sequences as the token formulation); `"wishart"`: S⁰ = G Z Gᵀ with Z ~ Wishart_D(n, I)
    drawn by the CPU kernel (Bartlett, see the module docstring), the cost independent of n.
    Off the CPU (or without the kernel), `"wishart"` samples tokens: the same distribution,
    other draws."""
    return _draw_stats(key, task, batch, dtype, sampler, None)[0]


def sample_weighted_stats(
    key: PRNGKeyArray,
    task: TaskConfig,
    batch: int,
    proposal: Proposal,
    dtype=jnp.float32,
    sampler: str = "wishart",
) -> tuple[Stats, Float[Array, " batch"]]:
    """`batch` sequences as statistics drawn from an importance-sampling `proposal` (each
    component's share of the sequences with its covariates and task vector scaled), and
    each sequence's log weight log f/q (`eqicl.Proposal`): the weighted mean of any
    per-sequence quantity is unbiased for its expectation under the task. With
    `eqicl.PLAIN` these are the sequences of `sample_stats` and every weight is 1."""
    st, log_w = _draw_stats(key, task, batch, dtype, sampler, proposal)
    assert log_w is not None  # given a proposal, _draw_stats always weighs
    return st, log_w


def sample_weighted_batch(
    key: PRNGKeyArray, task: TaskConfig, batch: int, proposal: Proposal, dtype=jnp.float32
) -> tuple[Batch, Float[Array, " batch"]]:
    """`batch` sequences as tokens drawn from `proposal`, and each one's log weight log f/q:
    the sequences `sample_weighted_stats(..., sampler="tokens")` takes its statistics of."""
    scales = proposal.scales(batch, dtype)
    b = sample_batch(
        key, task, batch, dtype, x_scale=scales[0], w_scale=scales[1], e_scale=scales[2]
    )
    sum_x2 = jnp.sum(b.x**2, axis=(1, 2))
    sum_e2 = None
    if proposal.scales_noise:
        sum_e2 = jnp.sum(noise_draws(key, task, batch, dtype, scales[2]) ** 2, axis=-1)
    return b, proposal.log_weight(sum_x2, jnp.sum(b.w**2, axis=-1), task.n, task.d, sum_e2)


def _draw_stats(key, task, batch, dtype, sampler, proposal):
    if sampler == "tokens" or not _kernel.sampler_usable():
        if proposal is None:
            b, log_w = sample_batch(key, task, batch, dtype), None
        else:
            b, log_w = sample_weighted_batch(key, task, batch, proposal, dtype)
        st = stats_from_batch(b)
        return Stats(s=_shard_batch(st.s), xq=_shard_batch(st.xq), yq=st.yq, sigma=st.sigma), log_w
    scales = None if proposal is None else proposal.scales(batch, dtype)
    d, n = task.d, task.n
    kz, ks = jr.split(key)
    z, normals = _kernel.sample_wishart(kz, n, d + 1, batch, 2 * d, dtype)
    w, xq = normals[:d], normals[d:]
    sigma = sample_sigma(ks, task, batch, dtype)
    # S⁰ = G Z Gᵀ, G = [[I, 0], [wᵀ, σ]]: Σ = Z_xx, α = Z_xx w + σ z_xy,
    # λ = wᵀ Z_xx w + 2σ wᵀ z_xy + σ² z_yy (sums unrolled: batch-last multiply-adds).
    zxx, zxy, zyy = z[:d, :d], z[:d, d], z[d, d]
    if scales is not None:  # a proposal
        # x_i = c z_i scales Z_xx by c² and z_xy by c; w = b z_w; ξ = a z_y scales z_xy by a
        # and z_yy by a².
        c, b, a = scales
        zxx, zxy, w = zxx * (c**2)[None, None], zxy * (c * a)[None], w * b[None]
        zyy = zyy * a**2
    zw = zxx[:, 0] * w[0][None]
    for j in range(1, d):
        zw = zw + zxx[:, j] * w[j][None]
    alpha = zw + sigma[None] * zxy
    lam = jnp.sum(w * (zw + 2 * sigma[None] * zxy), axis=0) + sigma**2 * zyy
    top = jnp.concatenate([zxx, alpha[:, None]], axis=1)
    bottom = jnp.concatenate([alpha, lam[None]], axis=0)[None]
    s = jnp.concatenate([top, bottom], axis=0)
    st = Stats(s=_shard_batch(s), xq=_shard_batch(xq), yq=jnp.sum(xq * w, axis=0), sigma=sigma)
    if proposal is None:
        return st, None
    sum_x2 = jnp.trace(zxx, axis1=0, axis2=1)
    return st, proposal.log_weight(sum_x2, jnp.sum(w**2, axis=0), n, d, zyy)


# ---------------------------------------------------------------------------------------------
# Loss.


def spd_solve(m: Float[Array, "d d batch"], b: Float[Array, "d batch"]) -> Float[Array, "d batch"]:
    """m⁻¹ b per sequence for symmetric positive-definite m: an unrolled Cholesky
    factorisation and two triangular solves, vectorised over the batch (a batched LAPACK
    call runs one tiny matrix at a time)."""
    d = m.shape[0]
    lo: dict[tuple[int, int], Array] = {}  # the Cholesky factor's lower triangle
    for j in range(d):
        acc = m[j, j]
        for k in range(j):
            acc = acc - lo[j, k] ** 2
        lo[j, j] = jnp.sqrt(acc)
        inv = 1.0 / lo[j, j]
        for i in range(j + 1, d):
            acc = m[i, j]
            for k in range(j):
                acc = acc - lo[i, k] * lo[j, k]
            lo[i, j] = acc * inv
    z: dict[int, Array] = {}
    for i in range(d):
        acc = b[i]
        for k in range(i):
            acc = acc - lo[i, k] * z[k]
        z[i] = acc / lo[i, i]
    x: dict[int, Array] = {}
    for i in reversed(range(d)):
        acc = z[i]
        for k in range(i + 1, d):
            acc = acc - lo[k, i] * x[k]
        x[i] = acc / lo[i, i]
    return jnp.stack([x[i] for i in range(d)])


def posterior_mean(st: Stats) -> Float[Array, "d batch"]:
    """μ = (Σ + σ²I)⁻¹α of every sequence (SPEC §5); in the CPU kernel where it applies."""
    if _kernel.usable():
        return _kernel.posterior_mean(st.s, st.sigma)
    d = st.s.shape[0] - 1
    eye = jnp.eye(d, dtype=st.s.dtype)[:, :, None]
    return spd_solve(st.s[:d, :d] + st.sigma[None, None, :] ** 2 * eye, st.s[:d, d])


def per_sequence_loss(
    model: LinearTransformer, st: Stats, objective: str
) -> Float[Array, " batch"]:
    """`exact`: ½‖wᴸ − μ‖²; `sampled`: ½(ŷ − y_t)², from the statistics."""
    w = final_weights(model, st.s)
    if objective == "exact":
        return 0.5 * jnp.sum((w - lax.stop_gradient(posterior_mean(st))) ** 2, axis=0)
    return 0.5 * (jnp.sum(w * st.xq, axis=0) - st.yq) ** 2
