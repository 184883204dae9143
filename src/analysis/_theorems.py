"""Measurements of the Theorem 5.1 and 5.2 constructions (`eqicl.theorem51_transformer`,
`eqicl.theorem52_transformer`), run through the model's forward pass, and their figures."""

import math
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from matplotlib.figure import Figure

import eqicl

from ._probes import estimate, model_coords, sample_probe

MACHINE = "2-core AMD EPYC Zen 5, CPU, float64"


def _noiseless(key, d: int, n: int, size: int, scale=None):
    """Noiseless sequences (σ = 0: the oracle is OLS, = w_τ for n ≥ d), covariates scaled by
    `scale` per sequence (Σ ↦ scale² Σ) if given."""
    sigma = jnp.zeros((size,), jnp.float64)
    b = sample_probe(key, d, n, sigma)
    if scale is None:
        return b
    s = jnp.asarray(scale, jnp.float64)
    x, xq = b.x * s[:, None, None], b.xq * s[:, None]
    return eqicl.Batch(
        x=x, y=jnp.einsum("bnd,bd->bn", x, b.w), xq=xq, yq=b.yq * s, w=b.w, sigma=sigma
    )


def _losses(model, batch):
    sp = eqicl.spectral(batch)
    c = model_coords(model, batch, sp)
    return np.asarray(eqicl.exact_loss(sp, c)), sp, c


@eqx.filter_jit
def _gd_scores(sp: eqicl.Spectral, etas, steps: int):
    return jax.lax.map(
        lambda g: jnp.mean(eqicl.exact_loss(sp, eqicl.gd_coords(sp, g, steps))), etas
    )


def _best_gd(sp: eqicl.Spectral, steps: int) -> tuple[float, np.ndarray]:
    """GD with `steps` steps and its step size tuned on these sequences (grid, first order)."""
    grid = np.logspace(-4, -1, 121)
    scores = np.asarray(_gd_scores(sp, jnp.asarray(grid), steps))
    eta = float(grid[int(np.argmin(np.where(np.isfinite(scores), scores, np.inf)))])
    return eta, np.asarray(eqicl.exact_loss(sp, eqicl.gd_coords(sp, jnp.asarray(eta), steps)))


def theorem51_depth(
    covers=(110.0, 50.0),
    max_steps: int = 14,
    sequences: int = 20_000,
    seed: int = 0,
    d: int = 10,
    n: int = 20,
) -> dict:
    """Error ½‖w^K − w_OLS‖² of the Theorem 5.1 model against depth (K preconditioning
    layers + 1 GD layer), on noiseless N(0, I) sequences: all of them, the covered ones
    (λ_max(Σ) ≤ Λ_0) and the others; tuned GD with as many steps for contrast; and the largest
    relative deviation of the forward pass from the closed form g^K per eigen-direction."""
    batch = _noiseless(jr.key(seed), d, n, sequences)
    sp = eqicl.spectral(batch)
    e = np.asarray(sp.e)
    lam_max, lam_min = e[:, -1], e[:, 0]
    out: dict = {
        "d": d,
        "n": n,
        "sequences": sequences,
        "seed": seed,
        "lam_max": estimate(lam_max) | {"quantiles": _quantiles(lam_max)},
        "lam_min": estimate(lam_min) | {"quantiles": _quantiles(lam_min)},
        "covers": {},
        "gd": [],
    }
    for cover in covers:
        covered = lam_max <= cover
        rows = []
        for k in range(max_steps + 1):
            model = eqicl.theorem51_transformer(cover, k, d)
            loss, _, coords = _losses(model, batch)
            shrink = eqicl.theorem51_shrinkage(e, cover, k)
            closed = 0.5 * np.sum(((1.0 - shrink) * np.asarray(sp.a) / e) ** 2, axis=-1)
            dev = np.abs(np.asarray(coords) - shrink * np.asarray(sp.a) / e)
            rows.append(
                {
                    "layers": k + 1,
                    "all": estimate(loss),
                    "covered": estimate(loss[covered]),
                    "uncovered": estimate(loss[~covered]) if (~covered).any() else None,
                    "closed_form_mean": float(np.mean(closed)),
                    "closed_form_max_abs_dev": float(np.max(dev)),
                }
            )
        out["covers"][str(cover)] = {
            "lam_cover": cover,
            "covered_share": float(covered.mean()),
            "depth": rows,
        }
    for k in range(max_steps + 1):
        eta, loss = _best_gd(sp, k + 1)
        out["gd"].append({"layers": k + 1, "eta": eta, "all": estimate(loss)})
    return out


def _quantiles(v) -> dict:
    qs = (0.001, 0.01, 0.5, 0.99, 0.999)
    return {str(q): float(np.quantile(v, q)) for q in qs} | {
        "max": float(np.max(v)),
        "min": float(np.min(v)),
    }


def theorem51_beyond(
    cover: float = 110.0,
    steps: int = 9,
    sequences: int = 5_000,
    seed: int = 1,
    d: int = 10,
    n: int = 20,
    scales=(0.25, 4.0),
) -> dict:
    """Per-sequence error of one Theorem 5.1 model on spectra inside and outside its bound:
    covariates scaled by c, log-uniform in `scales`, so λ_max(Σ) spans about 3 … 800."""
    k_s, k_b = jr.split(jr.key(seed))
    lo, hi = np.log(scales[0]), np.log(scales[1])
    c = jnp.exp(jr.uniform(k_s, (sequences,), jnp.float64, lo, hi))
    batch = _noiseless(k_b, d, n, sequences, c)
    model = eqicl.theorem51_transformer(cover, steps, d)
    loss, sp, _ = _losses(model, batch)
    e = np.asarray(sp.e)
    tau_max, tau_min = e[:, -1] / cover, e[:, 0] / cover
    bands = {}
    for name, mask in {
        "tau_max<=1": tau_max <= 1,
        "1<tau_max<=3": (tau_max > 1) & (tau_max <= 3),
        "3<tau_max<=5": (tau_max > 3) & (tau_max <= 5),
        "tau_max>5": tau_max > 5,
    }.items():
        bands[name] = estimate(loss[mask]) if mask.any() else None
    return {
        "lam_cover": cover,
        "layers": steps + 1,
        "sequences": sequences,
        "seed": seed,
        "scales": list(scales),
        "bands": bands,
        "points": {"tau_max": tau_max.tolist(), "tau_min": tau_min.tolist(), "loss": loss.tolist()},
    }


def theorem52_vs_n(
    ns=(30, 40, 80, 160, 320, 640, 1280, 2560),
    levels=(1.0, 3.0),
    sequences: int = 2_000,
    seed: int = 2,
    d: int = 10,
    reference_n: int = 20,
) -> dict:
    """The Theorem 5.2 model's adjusted loss at each of its two levels (= ½‖w² − ridge_k‖²,
    ridge_k the oracle of level k) against n, beside OLS, the other level's ridge and the
    large-n ridge α/(n + σ_k²) the construction aims at. Two regimes: fixed levels `levels`,
    and levels growing with n, σ_k² = σ_k² n / `reference_n` (the same signal-to-noise per
    point as at n = 20, where ridge stays apart from OLS)."""
    out: dict = {
        "d": d,
        "sequences": sequences,
        "seed": seed,
        "levels": list(levels),
        "reference_n": reference_n,
        "regimes": {},
    }
    for regime in ("fixed", "scaled"):
        rows = []
        for i, n in enumerate(ns):
            lv = [s * math.sqrt(n / reference_n) if regime == "scaled" else s for s in levels]
            try:
                c = eqicl.theorem52(n, d, lv[0], lv[1])
            except ValueError as err:
                rows.append({"n": n, "levels": lv, "error": str(err)})
                continue
            model = eqicl.theorem52_transformer(n, d, lv[0], lv[1])
            row = {"n": n, "levels": lv, "eta": c.eta, "omega": c.omega, "at": []}
            for j, s in enumerate(lv):
                key = jr.fold_in(jr.fold_in(jr.key(seed), i), 2 * j + (regime == "scaled"))
                row["at"].append(_level_losses(model, key, d, n, s, lv[1 - j], sequences))
            rows.append(row)
        out["regimes"][regime] = rows
    return out


def _level_losses(model, key, d, n, s, other, sequences, chunk=500):
    acc: dict[str, list] = {}
    for i, start in enumerate(range(0, sequences, chunk)):
        size = min(chunk, sequences - start)
        b = sample_probe(jr.fold_in(key, i), d, n, jnp.full((size,), s, jnp.float64))
        sp = eqicl.spectral(b)
        coords = {
            "construction": model_coords(model, b, sp),
            "ols": sp.a / sp.e,
            "other_ridge": sp.a / (sp.e + other**2),
            "alpha_over_n_plus_s2": sp.a / (n + s**2),
        }
        for name, cc in coords.items():
            acc.setdefault(name, []).append(np.asarray(eqicl.exact_loss(sp, cc)))
        acc.setdefault("ridge_norm2", []).append(np.asarray(jnp.sum(sp.oracle**2, axis=-1)))
    out = {name: estimate(np.concatenate(v)) for name, v in acc.items()}
    return {"sigma": s, **out}


# --------------------------------------------------------------------------------------------
# Figures


def _save(fig: Figure, path: pathlib.Path) -> pathlib.Path:
    fig.savefig(path, dpi=110)
    return path


def plot_theorem51(depth: dict, beyond: dict, path: pathlib.Path) -> pathlib.Path:
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    colors = {0: "C0", 1: "C1", 2: "C3"}
    for i, cv in enumerate(depth["covers"].values()):
        rows = cv["depth"]
        layers = [r["layers"] for r in rows]
        col = colors[i % 3]
        mean = [r["covered"]["mean"] for r in rows]
        worst = [r["covered"]["max"] for r in rows]
        ax1.semilogy(
            layers,
            mean,
            "o-",
            color=col,
            label=f"Λ₀ = {cv['lam_cover']:g}: mean, covered ({cv['covered_share']:.1%})",
        )
        ax1.semilogy(
            layers,
            worst,
            "^:",
            color=col,
            ms=4,
            label=f"Λ₀ = {cv['lam_cover']:g}: largest, covered",
        )
        if any(r["uncovered"] for r in rows):
            unc = [r["uncovered"]["mean"] if r["uncovered"] else np.nan for r in rows]
            ax1.semilogy(
                layers,
                unc,
                "s--",
                color=col,
                ms=4,
                mfc="none",
                label=f"Λ₀ = {cv['lam_cover']:g}: mean, λ_max > Λ₀",
            )
    gd = depth["gd"]
    ax1.semilogy(
        [r["layers"] for r in gd],
        [r["all"]["mean"] for r in gd],
        "k.-",
        label="GD, tuned step (first order)",
    )
    ax1.axhspan(1e-29, 1e-27, color="0.85", zorder=0)
    ax1.text(1, 2e-27, "float64 round-off", fontsize=8, color="0.35")
    ax1.set_xlabel("layers (K preconditioning + 1 GD step)")
    ax1.set_ylabel("½‖w − w_OLS‖² (noiseless: adjusted loss)")
    ax1.set_title(
        f"Theorem 5.1 against depth, {depth['sequences']:,} sequences, "
        f"n = {depth['n']}, d = {depth['d']}",
        fontsize=10,
    )
    ax1.grid(True, which="major", alpha=0.3)
    ax1.legend(fontsize=7.5, loc="center left")
    pts = beyond["points"]
    tmax, loss = np.asarray(pts["tau_max"]), np.asarray(pts["loss"], np.float64)
    tmin = np.asarray(pts["tau_min"])
    top = 1e10
    blown = ~np.isfinite(loss) | (loss > top)
    sc = ax2.scatter(
        tmax[~blown],
        np.maximum(loss[~blown], 1e-31),
        c=np.log10(tmin[~blown]),
        s=4,
        cmap="viridis",
        vmin=np.log10(tmin).min(),
        vmax=np.log10(tmin).max(),
    )
    ax2.scatter(
        tmax[blown],
        np.full(blown.sum(), top),
        marker="^",
        s=10,
        color="C3",
        label=f"blown up (> {top:g} or not finite): {blown.sum()} of {loss.size}",
    )
    fig.colorbar(sc, ax=ax2, label="log₁₀(λ_min / Λ₀)")
    for t, lab in ((1, "Λ₀"), (3, "3Λ₀"), (5, "5Λ₀")):
        ax2.axvline(t, color="0.4", ls="--", lw=0.8)
        ax2.text(t * 1.04, 1e-6, lab, fontsize=8)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_ylim(3e-32, top * 30)
    ax2.legend(fontsize=8, loc="upper left")
    ax2.set_xlabel(
        "λ_max(XᵀX) / Λ₀  (covariates scaled by c, log-uniform in "
        f"[{beyond['scales'][0]:g}, {beyond['scales'][1]:g}])"
    )
    ax2.set_ylabel("½‖w − w_OLS‖², per sequence")
    ax2.set_title(
        f"one model (Λ₀ = {beyond['lam_cover']:g}, {beyond['layers']} layers) "
        "inside and outside its bound",
        fontsize=10,
    )
    fig.suptitle(f"Theorem 5.1 construction (GD++, hand-set) — {MACHINE}", fontsize=11)
    return _save(fig, path)


def plot_theorem52(result: dict, path: pathlib.Path) -> pathlib.Path:
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    names = {
        "construction": ("two-layer construction", "-", "o"),
        "alpha_over_n_plus_s2": ("α/(n + σ²) (its large-n target)", ":", "x"),
        "ols": ("OLS", "--", "s"),
        "other_ridge": ("ridge of the other level", "-.", "^"),
    }
    for ax, (regime, rows) in zip(axes, result["regimes"].items(), strict=True):
        ok = [r for r in rows if "at" in r]
        ns = [r["n"] for r in ok]
        for j, col in enumerate(("C0", "C3")):
            for name, (label, ls, mk) in names.items():
                mean = np.array([r["at"][j][name]["mean"] for r in ok])
                se = np.array([r["at"][j][name]["se"] for r in ok])
                lvl = "σ₁" if j == 0 else "σ₂"
                ax.errorbar(
                    ns,
                    mean,
                    yerr=se,
                    ls=ls,
                    marker=mk,
                    color=col,
                    ms=4,
                    capsize=2,
                    label=f"{label}, at {lvl}",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("context length n")
        ax.set_ylabel("½‖w − ridge_σ‖² at level σ (= adjusted loss)")
        s = result["levels"]
        if regime == "fixed":
            title = f"fixed levels σ ∈ {{{s[0]:g}, {s[1]:g}}}"
        else:
            title = (
                f"levels σ² = σ₀² n/{result['reference_n']}, σ₀ ∈ {{{s[0]:g}, {s[1]:g}}} "
                "(ridge stays apart from OLS)"
            )
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        skipped = [r["n"] for r in rows if "at" not in r]
        if skipped:
            ax.text(
                0.02, 0.02, f"no construction at n = {skipped}", transform=ax.transAxes, fontsize=8
            )
    axes[0].legend(fontsize=7, ncol=2, loc="lower left")
    fig.suptitle(
        f"Theorem 5.2 construction (layer 1 w_yx, layer 2 w_yy), "
        f"{result['sequences']:,} sequences per level and n — {MACHINE}",
        fontsize=11,
    )
    return _save(fig, path)
