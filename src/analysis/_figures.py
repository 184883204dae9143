"""PNG figures of an analysis. Built on `matplotlib.figure.Figure` rather than pyplot, so no
global state and no display: `savefig` renders with the Agg canvas."""

import pathlib

import numpy as np
from matplotlib.figure import Figure

from eqicl import MODEL_ROWS

_NAMES = ("w_xx", "w_xy", "w_yx", "w_yy")
_MEANING = ("preconditioner", "noise-adaptive step", "gradient step", "adaptive rescaling")


def _save(fig: Figure, path: pathlib.Path) -> pathlib.Path:
    fig.savefig(path, dpi=110)
    return path


def _layer_colors(layers: int):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(layers - 1, 1) * 0.9) for i in range(layers)]


def plot_pq(p, q, path: pathlib.Path) -> pathlib.Path:
    """Heatmaps of every layer's P_k and Q_k in paper units (the paper's Figure 4): one column
    per layer, rows P, Q for each head, each panel on its own symmetric colour scale."""
    p, q = np.asarray(p), np.asarray(q)
    layers, heads = p.shape[:2]
    rows = [(f"P (head {k + 1})" if heads > 1 else "P", p[:, k]) for k in range(heads)]
    rows += [(f"Q (head {k + 1})" if heads > 1 else "Q", q[:, k]) for k in range(heads)]
    fig = Figure(figsize=(2.6 * layers + 0.6, 2.4 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), layers, squeeze=False)
    for r, (name, mats) in enumerate(rows):
        for j in range(layers):
            ax = axes[r, j]
            m = mats[j]
            lim = float(np.max(np.abs(m))) or 1.0
            im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"layer {j + 1}: {name}", fontsize=9)
            fig.colorbar(im, ax=ax, shrink=0.8, format="%.2g")
    fig.suptitle("P and Q of every layer (paper units; last row/column is y)")
    return _save(fig, path)


def plot_coefficients(coef, kind: str, path: pathlib.Path) -> pathlib.Path:
    """w_xx, w_xy, w_yx, w_yy against the layer (DIAG / GD++: the model's coefficients; FULL:
    the block statistics of P and Q)."""
    coef = np.asarray(coef)
    layers = np.arange(1, coef.shape[0] + 1)
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for i, ax in enumerate(axes):
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.plot(layers, coef[:, i], "o-", color="C0")
        ax.set_title(f"{_NAMES[i]} ({_MEANING[i]})", fontsize=10)
        ax.set_xticks(layers)
        ax.set_xlabel("layer")
    source = "block statistics of P, Q" if kind == "full" else "paper units"
    fig.suptitle(f"{MODEL_ROWS[kind]} coefficients per layer ({source})")
    return _save(fig, path)


def plot_loss_after_layers(weights: dict, path: pathlib.Path) -> pathlib.Path:
    """The exact adjusted loss ½‖w^l − μ‖² after k layers (k = 0: predicting 0), with OLS
    and the best single ridge λ on the same sequences for reference."""
    oracle = weights["oracle"]
    k = np.arange(len(oracle))
    mean = np.array([v["mean"] for v in oracle])
    se = np.array([v["se"] for v in oracle])
    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.errorbar(k, mean, yerr=se, fmt="o-", capsize=3, label="model after k layers")
    ax.axhline(
        weights["best_constant_loss"],
        color="C2",
        ls="--",
        label=f"ridge, best single λ = {weights['best_constant_lambda']:.3g}",
    )
    if weights["lambdas"][0] == 0:
        ax.axhline(weights["ridge_loss"][0], color="C3", ls=":", label="OLS")
    ax.set_yscale("log")
    ax.set_xticks(k)
    ax.set_xlabel("layers k")
    ax.set_ylabel("adjusted loss ½‖w^k − μ‖²")
    ax.set_title("loss after k layers")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_noise(per_sigma: dict, kind: str, path: pathlib.Path) -> pathlib.Path:
    """Against σ, one line per layer: the effective step w_yx(1 + w_xy ρ), the rescaling
    1 + δ^l, the ridge λ that best fits w^l (the oracle's is σ²), and the adjusted loss."""
    sig = np.asarray(per_sigma["sigma"])
    step = np.asarray(per_sigma["effective_step"])
    rescale = np.asarray(per_sigma["rescaling"])
    lam = np.asarray(per_sigma["best_lambda"])[:, 1:]  # drop l = 0 (w = 0 fits λ = ∞)
    loss = np.asarray(per_sigma["oracle"])[:, 1:]
    layers = step.shape[1]
    colors = _layer_colors(layers)
    fig = Figure(figsize=(11, 8), layout="constrained")
    (a1, a2), (a3, a4) = fig.subplots(2, 2)
    for j in range(layers):
        lab = f"layer {j + 1}"
        a1.plot(sig, step[:, j], "o-", color=colors[j], label=lab)
        a2.plot(sig, rescale[:, j], "o-", color=colors[j], label=lab)
        a3.plot(sig, lam[:, j], "o-", color=colors[j], label=lab)
        a4.plot(sig, loss[:, j], "o-", color=colors[j], label=lab)
    a1.axhline(0.0, color="0.6", lw=0.8)
    approx = " (block statistics)" if kind == "full" else ""
    a1.set_title(f"effective step w_yx(1 + w_xy ρ){approx}", fontsize=10)
    a1.set_ylabel("< 0: descent step")
    a2.axhline(1.0, color="0.6", lw=0.8)
    a2.set_title("rescaling 1 + δ^l (DIAG: 1 + w_yy λ^l)", fontsize=10)
    a3.plot(sig, sig**2, "k--", label="σ² (oracle)")
    a3.set_yscale("symlog", linthresh=1e-2)
    a3.set_title("ridge λ that best fits w^l", fontsize=10)
    a4.set_yscale("log")
    a4.set_title("adjusted loss ½‖w^l − μ‖²", fontsize=10)
    for ax in (a1, a2, a3, a4):
        ax.set_xlabel("noise σ")
        ax.legend(fontsize=7)
    fig.suptitle("noise adaptation, per layer, at fixed σ")
    return _save(fig, path)


def plot_training(metrics: list[dict], path: pathlib.Path) -> pathlib.Path:
    """The training curve of a run (its metrics.jsonl records): every seed's mean loss per
    logged call (log scale), and the logged learning rate; a seed's rollbacks show as the
    steps where its curve restarts from an earlier step."""
    fig = Figure(figsize=(10, 3.6))
    ax, ax_lr = fig.subplots(1, 2)
    seeds = max((len(m.get("loss", [])) for m in metrics), default=0)
    for k in range(seeds):
        pts = [(m["step"], m["loss"][k]) for m in metrics if len(m.get("loss", [])) > k]
        pts = [(s, v) for s, v in pts if v is not None and np.isfinite(v) and v > 0]
        if pts:
            ax.plot(*zip(*pts, strict=True), lw=1, label=f"seed {k}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean of a call)")
    if seeds:
        ax.legend(fontsize=7, ncol=2)
    # Each seed's rate as used (a list per call); files written before that log one rate.
    rates = [(m["step"], np.atleast_1d(m["lr"])) for m in metrics if m.get("lr") is not None]
    for k in range(max((len(r) for _, r in rates), default=0)):
        pts = [(s, r[k] if len(r) > k else r[0]) for s, r in rates]
        ax_lr.plot(
            *zip(*pts, strict=True), lw=1, label=f"seed {k}" if len(rates[0][1]) > 1 else None
        )
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate used (logged)")
    fig.suptitle("training curve (metrics.jsonl)")
    fig.tight_layout()
    return _save(fig, path)


def write_figures(result: dict, out_dir: pathlib.Path) -> dict[str, str]:
    """All figures of an `analyse` result (plus `per_sigma` if present) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "pq": plot_pq(result["P"], result["Q"], out_dir / "pq_heatmaps.png"),
        "coefficients": plot_coefficients(
            result["coefficients"]["values"], result["kind"], out_dir / "coefficients.png"
        ),
        "loss_after_layers": plot_loss_after_layers(
            result["weights"], out_dir / "loss_after_layers.png"
        ),
    }
    if result.get("metrics"):
        paths["training"] = plot_training(result["metrics"], out_dir / "training_curve.png")
    if result.get("per_sigma"):
        paths["noise"] = plot_noise(
            result["per_sigma"], result["kind"], out_dir / "noise_adaptation.png"
        )
    return {k: str(v) for k, v in paths.items()}
