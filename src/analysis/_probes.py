"""Generalisation probes: a trained model and the baselines on the same sequences drawn away
from the training distribution (context length, anisotropic covariates, noise laws).

The losses, derived for this module (tests/test_probes.py checks them):

- Covariates x_i, x_t ~ N(0, Σ_x), w_τ ~ N(0, I), Gaussian noise. The posterior of w_τ given
  the context is still N(μ, C) with μ = (Σ + σ²I)⁻¹α, C = σ²(Σ + σ²I)⁻¹ (Σ = XᵀX): the
  likelihood only sees X through the context, whatever law X was drawn from. This needs the
  prior w ~ N(0, I); a prior N(0, Σ_w) would make μ = (Σ + σ² Σ_w⁻¹)⁻¹α. For ŷ = <w, x_t> and
  y_t = <w_τ, x_t>, E[½(ŷ − y_t)² | context] = ½(w − μ)ᵀΣ_x(w − μ) + ½ tr(Σ_x C), and the
  oracle's own loss is the second term, so the adjusted loss of one sequence is
  ½(w − μ)ᵀΣ_x(w − μ) exactly in expectation: the "exact" estimator.
- Non-Gaussian noise ξ (variance σ² still): μ is then not the posterior mean (it is the best
  estimator linear in y, for the known σ), so the exact estimator does not apply. Instead the
  query is integrated out with w_τ known: ½(w − w_τ)ᵀΣ_x(w − w_τ) − ½(μ − w_τ)ᵀΣ_x(μ − w_τ),
  the loss in excess of ridge with λ = σ² (the "excess" estimator). Its expectation equals the
  exact one under Gaussian noise; a model nonlinear in y (every DIAG / FULL one) may go below
  zero under other laws.

Every number is reported as an estimate over sequences (`estimate`): mean, standard error,
number of sequences, the largest per-sequence loss and the share of the sum carried by the top
0.1 % of sequences, which a deep model's rare blow-ups dominate (SPEC §9).
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

import eqicl

NOISE_LAWS = ("gaussian", "laplace", "student3", "uniform")


def estimate(values) -> dict:
    """Mean, standard error, sequences, median, largest value, the share of Σ|v| held by the
    top 0.1 % of sequences by |v| (at least one; for losses ≥ 0 the share of the mean), and
    how many values were not finite (the mean is then inf, the spread statistics NaN)."""
    v = np.asarray(values, np.float64).ravel()
    finite = np.isfinite(v)
    top = max(1, math.ceil(v.size / 1000))
    out = {"sequences": int(v.size), "nonfinite": int((~finite).sum())}
    if not finite.all():
        return out | {
            "mean": math.inf,
            "se": math.nan,
            "median": float(np.median(v)),
            "max": math.inf,
            "top_share": math.nan,
        }
    with np.errstate(over="ignore", invalid="ignore"):
        se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
        size = np.abs(v)
        total = float(size.sum())
        share = float(np.sort(size)[-top:].sum() / total) if total > 0 else math.nan
    return out | {
        "mean": float(v.mean()),
        "se": se,
        "median": float(np.median(v)),
        "max": float(v.max()),
        "top_share": share,
    }


def anisotropic_root(d: int, kappa: float, key: PRNGKeyArray, dtype=jnp.float64):
    """R with Σ_x = R Rᵀ of condition number `kappa`: eigenvalues geometric from 1 to 1/κ,
    scaled to tr Σ_x = d (the same E‖x‖² as N(0, I)), in a random orthonormal basis fixed
    by `key` (FULL models are not rotation-equivariant, so no axis is privileged)."""
    ev = np.geomspace(1.0, 1.0 / kappa, d) if d > 1 else np.ones(1)
    ev = ev * d / ev.sum()
    q, r = jnp.linalg.qr(jr.normal(key, (d, d), dtype))
    q = q * jnp.sign(jnp.diagonal(r))[None, :]
    return q * jnp.sqrt(jnp.asarray(ev, dtype))[None, :]


def _unit_noise(key, shape, law: str, dtype):
    if law == "gaussian":
        return jr.normal(key, shape, dtype)
    if law == "laplace":
        return jr.laplace(key, shape, dtype) / math.sqrt(2.0)
    if law == "student3":
        return jr.t(key, 3.0, shape, dtype) / math.sqrt(3.0)
    if law == "uniform":
        return jr.uniform(key, shape, dtype, -math.sqrt(3.0), math.sqrt(3.0))
    raise ValueError(f"unknown noise law {law!r} (one of {', '.join(NOISE_LAWS)})")


def sample_probe(
    key: PRNGKeyArray,
    d: int,
    n: int,
    sigma: Float[Array, " batch"],
    root: Float[Array, "d d"] | None = None,
    law: str = "gaussian",
) -> eqicl.Batch:
    """Sequences as `eqicl.sample_batch` draws them, but x_i, x_t = R z with z ~ N(0, I)
    (`root` R, default I), unit-variance noise of law `law` times σ_τ = `sigma`."""
    dtype = sigma.dtype
    batch = sigma.shape[0]
    kw, kx, kq, kn = jr.split(key, 4)
    w = jr.normal(kw, (batch, d), dtype)
    x = jr.normal(kx, (batch, n, d), dtype)
    xq = jr.normal(kq, (batch, d), dtype)
    if root is not None:
        x, xq = x @ root.T, xq @ root.T
    y = jnp.einsum("bnd,bd->bn", x, w) + sigma[:, None] * _unit_noise(kn, (batch, n), law, dtype)
    return eqicl.Batch(x=x, y=y, xq=xq, yq=jnp.einsum("bd,bd->b", xq, w), w=w, sigma=sigma)


class Scorer(eqx.Module):
    """Per-sequence adjusted losses of weights given in each sequence's eigenbasis of Σ:
    ½ (c − t)ᵀ G (c − t) − offset, with G = VᵀΣ_xV and t, offset per estimator (see the
    module docstring): exact, t = μ and offset 0; excess, t = Vᵀw_τ and offset the oracle's
    own value."""

    sp: eqicl.Spectral
    gram: Float[Array, "batch d d"]
    target: Float[Array, "batch d"]
    offset: Float[Array, " batch"]

    def __call__(self, coords: Float[Array, "batch d"]) -> Float[Array, " batch"]:
        diff = coords - self.target
        return 0.5 * jnp.einsum("bi,bij,bj->b", diff, self.gram, diff) - self.offset


@eqx.filter_jit
def make_scorer(batch: eqicl.Batch, cov: Float[Array, "d d"], exact: bool) -> Scorer:
    """The scorer of `batch` for query covariance Σ_x = `cov`."""
    sp = eqicl.spectral(batch)
    gram = jnp.einsum("bji,jk,bkl->bil", sp.v, cov, sp.v)
    if exact:
        return Scorer(sp=sp, gram=gram, target=sp.oracle, offset=jnp.zeros_like(sp.yq))
    target = sp.to_coords(batch.w)
    diff = sp.oracle - target
    offset = 0.5 * jnp.einsum("bi,bij,bj->b", diff, gram, diff)
    return Scorer(sp=sp, gram=gram, target=target, offset=offset)


@eqx.filter_jit
def model_coords(model: eqicl.LinearTransformer, batch: eqicl.Batch, sp: eqicl.Spectral):
    """The model's final implicit weights w^L of every sequence, in its eigenbasis of Σ."""
    w, _ = eqicl.model_weights_and_predictions(model, batch.x, batch.y, batch.xq)
    return sp.to_coords(w[:, -1])


# --------------------------------------------------------------------------------------------
# Baselines retuned on the probe's own distribution, for its own loss


@jax.jit
def _ridge_scores(scorer: Scorer, lams: Float[Array, " k"]) -> Float[Array, " k"]:
    sp = scorer.sp
    return jax.lax.map(lambda lam: jnp.mean(scorer(sp.a / (sp.e + lam))), lams)


@jax.jit
def _tuned_scores(scorer: Scorer, cm: Float[Array, "k 2"]) -> Float[Array, " k"]:
    sp = scorer.sp
    ada = sp.rss / (sp.n - sp.e.shape[-1])

    def one(p):
        return jnp.mean(scorer(sp.a / (sp.e + jnp.minimum(p[0] * ada, p[1])[:, None])))

    return jax.lax.map(one, cm)


def _argmin(values) -> int:
    v = np.asarray(values, np.float64)
    return int(np.argmin(np.where(np.isfinite(v), v, np.inf)))


@dataclasses.dataclass(frozen=True)
class Retuned:
    """ConstRR's λ and TunedRR's (multiplier, threshold) fitted on the probe's own tuning
    sequences for the probe's own loss (grid search, then a finer grid for λ)."""

    const_lambda: float
    tuned_c: float
    tuned_max: float


def retune(scorer: Scorer) -> Retuned:
    dt = scorer.sp.e.dtype
    grid = np.concatenate([[0.0], np.logspace(-4, 3.5, 151)])
    i = _argmin(_ridge_scores(scorer, jnp.asarray(grid, dt)))
    fine = np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)], 41)
    lam = float(fine[_argmin(_ridge_scores(scorer, jnp.asarray(fine, dt)))])
    c, top = 1.0, math.inf
    if scorer.sp.n > scorer.sp.e.shape[-1]:
        cs = np.logspace(-1.5, 1.0, 26)
        tops = np.concatenate([np.logspace(-2, 3.5, 34), [np.inf]])
        cc, tt = np.meshgrid(cs, tops, indexing="ij")
        pairs = jnp.asarray(np.stack([cc.ravel(), tt.ravel()], axis=1), dt)
        j = _argmin(_tuned_scores(scorer, pairs))
        c, top = float(cc.ravel()[j]), float(tt.ravel()[j])
    return Retuned(const_lambda=lam, tuned_c=c, tuned_max=top)


def baseline_coords(sp: eqicl.Spectral, train: eqicl.TunedBaselines, probe: Retuned) -> dict:
    """Every baseline's weights in eigen-coordinates: tuned on the training task (the same
    knowledge a trained model has) and retuned on the probe (`*` suffix: the best of their
    class for this probe)."""
    out = {k: v for k, v in train.coords(sp).items() if k != "oracle"}
    out["constrr*"] = sp.a / (sp.e + probe.const_lambda)
    if sp.n > sp.e.shape[-1]:
        ada = sp.rss / (sp.n - sp.e.shape[-1])
        lam = jnp.minimum(probe.tuned_c * ada, probe.tuned_max)
        out["tunedrr*"] = sp.a / (sp.e + lam[:, None])
    return out


# --------------------------------------------------------------------------------------------
# The probes


@dataclasses.dataclass(frozen=True)
class Probe:
    """One test distribution: context length `n`, covariate condition number `kappa`, noise
    law `law`, and σ_τ fixed at `sigma` (None: drawn from the training task's law).
    `family` and `value` say which of them the probe varies."""

    family: str
    value: int | float | str
    n: int
    kappa: float = 1.0
    law: str = "gaussian"
    sigma: float | None = None


FAMILIES = ("n", "kappa", "sigma", "law")


def default_probes(task: eqicl.TaskConfig) -> list[Probe]:
    """n = 5 … 80; κ = 1 … 100; σ fixed from 0 to twice the training range; the four laws."""
    top = task.sigma_range if task.sigma_range > 0 else 1.0
    out = [Probe("n", n, n) for n in (5, 10, 15, 20, 30, 40, 60, 80)]
    out += [Probe("kappa", k, task.n, kappa=float(k)) for k in (1, 3, 10, 30, 100)]
    out += [Probe("sigma", float(s), task.n, sigma=float(s)) for s in np.linspace(0, 2 * top, 9)]
    out += [Probe("law", law, task.n, law=law) for law in NOISE_LAWS]
    return out


def _draw_sigma(key, task: eqicl.TaskConfig, probe: Probe, size: int, dtype):
    if probe.sigma is not None:
        return jnp.full((size,), probe.sigma, dtype)
    if task.noise == "uniform":
        return jr.uniform(key, (size,), dtype, 0.0, task.sigma_max)
    if task.noise == "categorical":
        levels = jnp.asarray(task.sigma_set, dtype)
        return levels[jr.randint(key, (size,), 0, len(task.sigma_set))]
    return jnp.full((size,), task.sigma, dtype)


def _draw(key, task: eqicl.TaskConfig, probe: Probe, size: int, root):
    ks, kb = jr.split(key)
    sigma = _draw_sigma(ks, task, probe, size, jnp.float64)
    return sample_probe(kb, task.d, probe.n, sigma, root, probe.law)


def run_probe(
    model: eqicl.LinearTransformer,
    task: eqicl.TaskConfig,
    train_tuned: eqicl.TunedBaselines,
    probe: Probe,
    key: PRNGKeyArray,
    sequences: int = 20_000,
    tune_sequences: int = 10_000,
    chunk: int = 10_000,
) -> dict:
    """Per-method estimates (see `estimate`) of the adjusted loss on the probe's sequences:
    the model, the baselines tuned on the training task and those retuned on the probe."""
    k_root, k_tune, k_test = jr.split(key, 3)
    root = anisotropic_root(task.d, probe.kappa, k_root) if probe.kappa != 1 else None
    cov = root @ root.T if root is not None else jnp.eye(task.d, dtype=jnp.float64)
    exact = probe.law == "gaussian"
    probe_tuned = retune(make_scorer(_draw(k_tune, task, probe, tune_sequences, root), cov, exact))
    losses: dict[str, list] = {}
    for i, start in enumerate(range(0, sequences, chunk)):
        batch = _draw(jr.fold_in(k_test, i), task, probe, min(chunk, sequences - start), root)
        scorer = make_scorer(batch, cov, exact)
        coords = {"model": model_coords(model, batch, scorer.sp)}
        coords |= baseline_coords(scorer.sp, train_tuned, probe_tuned)
        for name, c in coords.items():
            losses.setdefault(name, []).append(np.asarray(scorer(c)))
    return {
        "estimator": "exact" if exact else "excess",
        "retuned": dataclasses.asdict(probe_tuned),
        "methods": {name: estimate(np.concatenate(v)) for name, v in losses.items()},
    }


def probe_model(
    model: eqicl.LinearTransformer,
    task: eqicl.TaskConfig,
    probes: list[Probe],
    seed: int = 0,
    sequences: int = 20_000,
    progress=None,
) -> dict:
    """Every probe of `probes` on `model` (float64), with the baselines tuned once on the
    training task (`eqicl.tune_baselines` on 20,000 sequences, GD with as many steps as the
    model has layers). The same seed gives every model the same sequences."""
    model = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, model)
    key = jr.key(seed)
    k_train, k_probes = jr.split(key)
    train_batch = eqicl.sample_batch(k_train, task, 20_000, jnp.float64)
    train_tuned = eqicl.tune_baselines(eqicl.spectral(train_batch), gd_steps=model.num_layers)
    results = []
    for i, probe in enumerate(probes):
        if progress is not None:
            progress(f"{probe.family} = {probe.value}")
        out = run_probe(model, task, train_tuned, probe, jr.fold_in(k_probes, i), sequences)
        results.append({**dataclasses.asdict(probe), **out})
    return {"train_tuned": dataclasses.asdict(train_tuned), "probes": results}


# --------------------------------------------------------------------------------------------
# Figure

_STYLE = {
    "model": ("model (mean)", "k", "-", "o"),
    "tunedrr": ("TunedRR (tuned on training task)", "tab:purple", "--", "s"),
    "tunedrr*": ("TunedRR* (retuned on the probe)", "tab:purple", ":", "D"),
    "adarr": ("AdaRR", "tab:orange", "--", "v"),
    "constrr": ("ConstRR (training λ)", "tab:gray", "--", "^"),
    "constrr*": ("ConstRR* (retuned)", "tab:gray", ":", "x"),
}
_CEIL = 1e3


def plot_probes(name: str, result: dict, path) -> None:
    """One panel per probe family: the model's mean and median adjusted loss beside the
    baselines on the same sequences; a mean above the plot's ceiling is marked at the top."""
    from matplotlib.figure import Figure

    probes = result["probes"]
    families = [f for f in FAMILIES if any(p["family"] == f for p in probes)]
    fig = Figure(figsize=(4.6 * len(families), 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(families)))
    labels = {
        "n": "context length n (trained at 20)",
        "kappa": "condition number κ of Σ_x (tr Σ_x = d)",
        "sigma": "fixed noise σ (Gaussian)",
        "law": "noise law (σ from the training law)",
    }
    for ax, fam in zip(axes, families, strict=True):
        ps = [p for p in probes if p["family"] == fam]
        cat = fam == "law"
        xs = np.arange(len(ps)) if cat else np.array([float(p["value"]) for p in ps])
        for method, (label, color, ls, mk) in _STYLE.items():
            if fam == "sigma" and method.endswith("*"):
                continue  # retuned at a fixed σ, ridge is the oracle itself
            est = [p["methods"].get(method) for p in ps]
            if all(e is None for e in est):
                continue
            mean = np.array([e["mean"] if e else np.nan for e in est])
            over = ~np.isfinite(mean) | (mean > _CEIL)
            shown = np.where(over, np.nan, mean)
            ax.plot(
                xs,
                shown,
                ls=ls,
                marker=mk,
                color=color,
                ms=4,
                lw=2 if method == "model" else 1,
                label=label,
            )
            if method == "model":
                med = np.array([e["median"] if e else np.nan for e in est])
                ax.plot(xs, med, ls="-.", color="k", lw=1, label="model (median sequence)")
                if over.any():
                    ax.plot(
                        xs[over],
                        np.full(over.sum(), _CEIL),
                        "^",
                        color="C3",
                        ms=8,
                        label=f"model mean > {_CEIL:g} (blown up)",
                    )
        if cat:
            ax.set_xticks(xs, [str(p["value"]) for p in ps])
            ax.set_yscale("symlog", linthresh=1e-2)
            ax.axhline(0.0, color="0.6", lw=0.8)
            ax.set_ylabel("excess over ridge λ = σ² (symlog)")
        else:
            ax.set_yscale("log")
            ax.set_ylabel("adjusted loss (exact estimator)")
        if fam in ("n", "kappa"):
            ax.set_xscale("log")
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
            ax.minorticks_off()
        ax.set_xlabel(labels[fam])
        edge = {"n": result["task"]["n"], "sigma": result["task"].get("sigma_range")}.get(fam)
        if edge is not None:
            ax.axvline(edge, color="0.5", lw=0.8, ls=":", label="training n / top of training σ")
        ax.set_ylim(bottom=None if cat else 1e-4, top=_CEIL * 3)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    seq = probes[0]["methods"]["model"]["sequences"] if probes else 0
    fig.suptitle(
        f"Generalisation probes of {name} ({result['task']['label']}), {seq:,} sequences "
        f"per point — 2-core AMD EPYC Zen 5, float64",
        fontsize=11,
    )
    fig.savefig(path, dpi=90)
