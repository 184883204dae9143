"""Expectations over sequences that see the tail (SPEC §9).

The adjusted loss is an expectation over sequences, and a deep linear transformer is a
polynomial of high degree in a sequence's statistics: it can be excellent on typical
sequences and explode on the rare ones whose Σ = XᵀX has a large eigenvalue. A plain average
over N sequences may hold none of them. Importance sampling reaches them at a bounded cost.

The proposal is a mixture: component k draws the context covariates x_i ~ N(0, c_k² I) and
the task vector w ~ N(0, b_k² I) (the query, σ_τ and the label noise keep their law), and
component 0 is the task's own law (c_0 = b_0 = 1). Component k takes a fixed share of the
sequences (deterministic mixture sampling), and every sequence is weighted by

    f/q = 1 / Σ_k π_k (q_k/f),  log q_k/f = −nd log c_k + (1 − c_k⁻²) tr(XᵀX)/2
                                            − d log b_k + (1 − b_k⁻²) ‖w‖²/2,

with π_k the realised share of component k. Then (1/N) Σ_i (f/q)_i g_i is unbiased for E_f[g]
for any function g of the sequence, and f/q ≤ 1/π_0: no weight can blow up. The weight
depends on tr(XᵀX) and ‖w‖² only, both known wherever a sequence is drawn.

Summaries (`summarize`) give, besides the mean and its standard error, what a reader needs to
judge whether a few sequences carry the number: the largest per-sequence loss, the share of
the mean carried by the top 0.1 % of the sequences' contributions, and the effective sample
size of the weights.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ._config import ConfigError


@dataclasses.dataclass(frozen=True)
class Proposal:
    """A mixture proposal: component k scales the covariates by `x_scales[k]`, the task
    vector by `w_scales[k]` and the label noise ξ by `e_scales[k]` (default: all 1, the
    noise keeps its law; σ_τ itself always does) and takes the share `shares[k]` of the
    sequences. Component 0 must be the task's own law (scales 1), so every weight is at most
    1/shares[0]."""

    x_scales: tuple[float, ...] = (1.0, 1.25, 1.5)
    w_scales: tuple[float, ...] = (1.0, 1.0, 1.25)
    shares: tuple[float, ...] = (0.5, 0.25, 0.25)
    e_scales: tuple[float, ...] | None = None

    def __post_init__(self):
        k = len(self.shares)
        e_scales = (1.0,) * k if self.e_scales is None else self.e_scales
        object.__setattr__(self, "e_scales", e_scales)
        if not (len(self.x_scales) == len(self.w_scales) == len(e_scales) == k) or k == 0:
            raise ConfigError(
                "a proposal needs as many x_scales, w_scales, e_scales and shares "
                f"({len(self.x_scales)}, {len(self.w_scales)}, {len(e_scales)}, {k})"
            )
        if self.x_scales[0] != 1.0 or self.w_scales[0] != 1.0 or e_scales[0] != 1.0:
            raise ConfigError(
                "a proposal's first component must be the task's law (x_scales[0] = "
                f"w_scales[0] = e_scales[0] = 1), got {self.x_scales[0]}, {self.w_scales[0]}, "
                f"{e_scales[0]}"
            )
        scales = (*self.x_scales, *self.w_scales, *e_scales)
        if any(not (1.0 <= c < math.inf) for c in scales):
            raise ConfigError(
                f"proposal scales must be finite and >= 1, got {self.x_scales}, {self.w_scales}"
                f", {self.e_scales}"
            )
        if any(not (0 < s < math.inf) for s in self.shares) or not math.isclose(
            sum(self.shares), 1.0, rel_tol=1e-9
        ):
            raise ConfigError(f"proposal shares must be positive and sum to 1, got {self.shares}")

    @property
    def plain(self) -> bool:
        """True for the task's law itself (every weight 1)."""
        return len(self.shares) == 1

    def counts(self, batch: int) -> tuple[int, ...]:
        """How many of `batch` sequences each component draws (largest remainders)."""
        raw = [s * batch for s in self.shares]
        counts = [math.floor(r) for r in raw]
        order = sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])
        for i in order[: batch - sum(counts)]:
            counts[i] += 1
        return tuple(counts)

    def component(self, batch: int) -> Int[Array, " batch"]:
        """The component of every sequence of a batch: the first counts[0] from component 0,
        and so on (which sequences get which is irrelevant: they are exchangeable)."""
        return jnp.asarray(np.repeat(np.arange(len(self.shares)), self.counts(batch)), jnp.int32)

    @property
    def scales_noise(self) -> bool:
        """True if some component scales the label noise."""
        assert self.e_scales is not None  # __post_init__ fills it in
        return any(a != 1.0 for a in self.e_scales)

    def scales(
        self, batch: int, dtype
    ) -> tuple[Float[Array, " batch"], Float[Array, " batch"], Float[Array, " batch"]]:
        """(x scale, w scale, noise scale) of every sequence of a batch."""
        k = self.component(batch)
        return (
            jnp.asarray(self.x_scales, dtype)[k],
            jnp.asarray(self.w_scales, dtype)[k],
            jnp.asarray(self.e_scales, dtype)[k],
        )

    def log_weight(
        self,
        sum_x2: Float[Array, " batch"],
        sum_w2: Float[Array, " batch"],
        n: int,
        d: int,
        sum_e2: Float[Array, " batch"] | None = None,
    ) -> Float[Array, " batch"]:
        """log f/q of every sequence from tr(XᵀX) (`sum_x2`, the n context covariates), ‖w‖²
        (`sum_w2`) and ‖ξ‖² (`sum_e2`, the n standard-normal noise draws as scaled; needed
        when the proposal scales the noise), for a batch of `sum_x2.shape[0]` sequences drawn
        by `scales`."""
        batch = sum_x2.shape[0]
        dt = sum_x2.dtype
        share = jnp.asarray(np.asarray(self.counts(batch), np.float64) / batch, dt)
        c = jnp.asarray(self.x_scales, dt)
        b = jnp.asarray(self.w_scales, dt)
        log_ratio = (
            -n * d * jnp.log(c)[:, None]
            + (1 - c**-2)[:, None] * sum_x2[None] / 2
            - d * jnp.log(b)[:, None]
            + (1 - b**-2)[:, None] * sum_w2[None] / 2
        )  # (components, batch): log q_k/f
        if self.scales_noise:
            if sum_e2 is None:
                raise ValueError("a proposal that scales the noise needs sum_e2")
            a = jnp.asarray(self.e_scales, dt)
            log_ratio = (
                log_ratio - n * jnp.log(a)[:, None] + (1 - a**-2)[:, None] * sum_e2[None] / 2
            )
        present = share > 0
        terms = jnp.where(
            present[:, None], jnp.log(jnp.where(present, share, 1.0))[:, None], -jnp.inf
        )
        return -jax.nn.logsumexp(terms + log_ratio, axis=0)


PLAIN = Proposal(x_scales=(1.0,), w_scales=(1.0,), shares=(1.0,))
"""The task's own law: plain sampling, every weight 1."""

DEFAULT = Proposal()
"""The tail-aware estimate's proposal (eval.proposal_*): its heaviest component scales the
covariates by 1.5, so it reaches sequences far rarer than any plain test draw."""

SELECT = Proposal(x_scales=(1.0, 1.1, 1.2), w_scales=(1.0, 1.0, 1.1), shares=(0.5, 0.25, 0.25))
"""The selection's proposal (train.select_proposal_*): it reaches beyond what a plain draw of
millions of sequences holds, but not so far that one sequence with an astronomical loss
decides between candidates (README "Estimates and tails")."""


def summarize(losses, log_weights=None, top: float = 1e-3) -> dict[str, float | int | bool]:
    """Mean, standard error and tail of per-sequence `losses` (optionally importance-weighted
    by exp(`log_weights`)): `sequences`, `mean`, `se`, `max` (the largest per-sequence loss),
    `top_share` (the share of the mean carried by the top `top` fraction of the sequences'
    contributions w_i ℓ_i / N), `top_sequences` (how many that is), `ess` (the effective
    sample size (Σw)²/Σw² of the weights; N without them) and `finite`. A sequence whose loss
    overflowed (inf, or NaN from inf − inf) makes the mean and the largest loss inf."""
    v = np.asarray(losses, np.float64).ravel()
    n = v.size
    w = np.ones(n) if log_weights is None else np.exp(np.asarray(log_weights, np.float64).ravel())
    contrib = w * v
    finite = bool(np.all(np.isfinite(contrib)))
    # Contributions beyond ~1e154 overflow a sum of squares (and beyond ~1e302 a sum): then
    # the same statistics are computed on contributions divided by the largest one.
    scale = 1.0
    if finite and n:
        with np.errstate(over="ignore"):
            if not (np.isfinite(contrib.sum()) and np.isfinite(np.sum(contrib * contrib))):
                scale = float(np.max(np.abs(contrib)))
    c = contrib / scale if scale != 1.0 else contrib
    if finite:
        mean = float(c.mean()) * scale if n else math.nan
        se = float(c.std(ddof=1) / math.sqrt(n)) * scale if n > 1 else math.nan
    else:  # an overflowed sequence (inf, or NaN from inf − inf): the mean is inf
        mean, se = math.inf, math.nan
    k = max(1, math.ceil(top * n))
    if finite and n:
        total = c.sum()
        head = np.partition(c, n - k)[n - k :].sum() if k < n else total
        share = float(head / total) if total > 0 else math.nan
    else:
        share = math.nan
    return {
        "sequences": n,
        "mean": mean,
        "se": se,
        "max": (float(np.max(v)) if finite else math.inf) if n else math.nan,
        "top_share": share,
        "top_sequences": k,
        "ess": float(w.sum() ** 2 / np.sum(w**2)) if n else 0.0,
        "finite": finite,
    }
