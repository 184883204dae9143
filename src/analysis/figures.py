"""`python -m analysis.figures [--paper-dir runs/paper]`: the paper's Figures 1–3 and 5–7.

Drawn only from the sweep's small committed files (table1.csv, cells/*.json,
baselines/*.json), so they redraw on a fresh clone without checkpoints. Panels whose cells
have not been run yet are left empty with a note. Figure 4 (P and Q heatmaps of the 4-layer
FULL model trained on σ ∈ {1, 3}) is drawn from that cell's trained
weights, which the sweep commits (`runs/paper/weights/full-L4-c1_3.npz`, or `--figure4-run` a run
directory or weights file), so it too redraws on a fresh clone.
"""

import argparse
import json
import math
import pathlib
import sys
from typing import cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from eqicl import BASELINE_NAMES, BASELINE_ROWS, MODEL_ROWS, paper_table  # noqa: E402
from eqicl.sweep import (  # noqa: E402
    COLUMNS,
    LAYERS,
    Cell,
    column_tag,
    read_baselines,
    read_table,
)

COLORS = {"gdpp": "tab:green", "diag": "tab:blue", "full": "tab:red"}
BASE_COLORS = {"constrr": "tab:gray", "adarr": "tab:orange", "tunedrr": "tab:purple"}
BASE_STYLE = {name: (BASELINE_NAMES[name], color) for name, color in BASE_COLORS.items()}


def _finite(value):
    """The JSON value with every non-finite number as NaN (a model that blows up on some
    sequences has an infinite profile point; matplotlib skips NaN, a log axis fails on inf)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return math.nan
    return value


def _cell(paper_dir: pathlib.Path, cell: Cell) -> dict | None:
    path = paper_dir / "cells" / f"{cell.name}.json"
    # A cell's file is a JSON object, and _finite keeps the structure.
    return cast(dict, _finite(json.loads(path.read_text()))) if path.exists() else None


def _baseline(paper_dir: pathlib.Path, column: str) -> dict | None:
    path = paper_dir / "baselines" / f"{column_tag(column)}.json"
    return cast(dict, _finite(json.loads(path.read_text()))) if path.exists() else None


def _legend(ax):
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)


def _empty(ax, text="not run yet"):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.5")


def figure1(paper_dir: pathlib.Path, rows) -> Figure:
    """Adjusted loss against depth, one panel per noise setting, every method; paper dashed."""
    table = paper_table()
    fig, axes = plt.subplots(2, 5, figsize=(20, 7.5), sharex=True)
    for ax, column in zip(axes.flat, COLUMNS, strict=True):
        for model, row_name in MODEL_ROWS.items():
            ours = [
                (c.layers, float(r["exact"]))
                for c, r in rows.items()
                if c.model == model and c.column == column
            ]
            ours.sort()
            if ours:
                ax.plot(
                    *zip(*ours, strict=True), "o-", color=COLORS[model], label=f"{row_name} (eqicl)"
                )
            ax.plot(
                LAYERS,
                [table[(row_name, layer, column)] for layer in LAYERS],
                "--",
                color=COLORS[model],
                alpha=0.5,
                label=f"{row_name} (paper)",
            )
        for name, (label, color) in BASE_STYLE.items():
            ax.axhline(
                table[(BASELINE_ROWS[name], None, column)],
                color=color,
                lw=1,
                ls=":",
                label=f"{label} (paper)",
            )
        ax.set_yscale("log")
        ax.set_title(
            f"σ ~ U(0, {column})"
            if not column.startswith("{")
            else f"σ ∈ {column.replace(';', ',')}"
        )
        ax.set_xlabel("layers")
    axes[0, 0].set_ylabel("adjusted loss")
    axes[1, 0].set_ylabel("adjusted loss")
    _legend(axes[0, 0])
    fig.suptitle("Figure 1: adjusted loss vs number of layers (solid: eqicl, dashed: paper)")
    fig.tight_layout()
    return fig


def _training_range(ax, column: str) -> None:
    """The paper's grey band: the σ range the models were trained on."""
    task_sigmas = (
        [float(v) for v in column.strip("{}").split(";")]
        if column.startswith("{")
        else [0.0, float(column)]
    )
    lo, hi = min(task_sigmas), max(task_sigmas)
    if hi > lo:
        ax.axvspan(lo, hi, color="0.9", zorder=0, label="training range")
    else:
        ax.axvline(hi, color="0.8", zorder=0, label="training σ")


def _clip_to(ax, values) -> None:
    """A log axis on the range where the methods are compared: deep models extrapolate
    explosively beyond the training range (up to 1e263 at 1.5 σ_max), and one spike must not
    flatten the rest; four decades below the baselines' largest value (they are 0 at σ = 0,
    which a log axis cannot show)."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if finite:
        top = max(finite)
        ax.set_ylim(1e-3 * top, 10 * top)
    ax.set_yscale("log")


def _profile_panel(ax, paper_dir, column, models, layers_list, title):
    _training_range(ax, column)
    drew = False
    for model in models:
        for layers in layers_list:
            data = _cell(paper_dir, Cell(model, layers, column))
            if data is None:
                continue
            prof = data["profile"]
            last = [v[-1] for v in prof["model"]]
            alpha = 0.35 + 0.65 * layers / max(LAYERS)
            ax.plot(
                prof["sigma"],
                last,
                color=COLORS[model],
                alpha=alpha,
                label=f"{MODEL_ROWS[model]} L={layers}",
            )
            drew = True
    base = _baseline(paper_dir, column)
    reference = []
    if base is not None:
        for name, (label, color) in BASE_STYLE.items():
            if name in base["profile"]["baselines"]:
                values = base["profile"]["baselines"][name]
                ax.plot(base["profile"]["sigma"], values, ls="--", color=color, label=label)
                reference += values
    if not drew:
        _empty(ax)
    ax.set_title(title)
    ax.set_xlabel("σ")
    ax.set_ylabel("adjusted loss")
    _clip_to(ax, reference)


def figure2(paper_dir: pathlib.Path) -> Figure:
    """Per-variance profiles for the uniform settings: DIAG at every depth and the baselines."""
    columns = ["1", "3", "5", "7"]
    fig, axes = plt.subplots(len(columns), 3, figsize=(15, 3.6 * len(columns)))
    for i, column in enumerate(columns):
        for j, model in enumerate(MODEL_ROWS):
            _profile_panel(
                axes[i, j],
                paper_dir,
                column,
                [model],
                LAYERS,
                f"{MODEL_ROWS[model]}, σ ~ U(0, {column})",
            )
    for ax in axes[0]:
        _legend(ax)
    fig.suptitle(
        "Figure 2: adjusted loss against σ (trained on σ ~ U(0, σ_max); dashed: baselines)"
    )
    fig.tight_layout()
    return fig


def figure3(paper_dir: pathlib.Path) -> Figure:
    """Per-variance profiles for the categorical settings: DIAG vs FULL."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for i, column in enumerate(["{1;3}", "{1;3;5}"]):
        for j, layers in enumerate([3, 5, 7]):
            _profile_panel(
                axes[i, j],
                paper_dir,
                column,
                ["diag", "full", "gdpp"],
                [layers],
                f"σ ∈ {column.replace(';', ',')}, {layers} layers",
            )
    for ax in axes[:, 0]:
        _legend(ax)
    fig.suptitle("Figure 3: categorical noise, adjusted loss against σ")
    fig.tight_layout()
    return fig


def _seed_band(data: dict) -> tuple[list[float], list[float]] | None:
    """The lowest and highest loss after every layer over a cell's training seeds (its
    `seed_losses`, recorded where the recipe trains several), or None."""
    seeds = data.get("seed_losses")
    if not seeds:
        return None
    per_layer = list(zip(*([e["mean"] for e in s["after_layer"]] for s in seeds), strict=True))
    return [min(v) for v in per_layer], [max(v) for v in per_layer]


def figure5(paper_dir: pathlib.Path) -> Figure:
    """Loss after k layers inside one trained model, σ ~ U(0, 5): per model, every depth's
    recorded model (the best of its seeds by validation loss) with the band its training
    seeds span; last panel, each depth's final loss with that band (the paper's shading)."""
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    base = _baseline(paper_dir, "5")
    table = paper_table()
    for ax, model in zip(axes[:3], MODEL_ROWS, strict=True):
        drew = False
        finals = []
        for layers in LAYERS:
            data = _cell(paper_dir, Cell(model, layers, "5"))
            if data is None:
                continue
            ks = [r["layer"] for r in data["after_layer"]]
            vals = [r["adjusted_exact"]["mean"] for r in data["after_layer"]]
            shade = 0.3 + 0.7 * layers / 7
            ax.plot(ks, vals, "o-", color=COLORS[model], alpha=shade, label=f"{layers}-layer model")
            band = _seed_band(data)
            if band is not None:
                ax.fill_between(ks, *band, color=COLORS[model], alpha=0.12 * shade, lw=0)
            finals.append((layers, vals[-1], band))
            drew = True
        if base is not None:
            for name, (label, color) in BASE_STYLE.items():
                ax.axhline(_base_value(paper_dir, name, "5"), color=color, ls=":", label=label)
        if not drew:
            _empty(ax)
        ax.set_yscale("log")
        ax.set_xlabel("k (layers applied)")
        ax.set_title(f"{MODEL_ROWS[model]}, σ ~ U(0, 5)")
        last = axes[-1]
        if finals:
            xs = [f[0] for f in finals]
            last.plot(
                xs, [f[1] for f in finals], "o-", color=COLORS[model], label=MODEL_ROWS[model]
            )
            banded = [f for f in finals if f[2] is not None]
            if banded:
                last.fill_between(
                    [f[0] for f in banded],
                    [f[2][0][-1] for f in banded],
                    [f[2][1][-1] for f in banded],
                    color=COLORS[model],
                    alpha=0.2,
                    lw=0,
                )
        last.plot(
            LAYERS,
            [table[(MODEL_ROWS[model], n, "5")] for n in LAYERS],
            "--",
            color=COLORS[model],
            alpha=0.5,
            label=f"{MODEL_ROWS[model]} (paper)",
        )
    axes[-1].set_yscale("log")
    axes[-1].set_xlabel("layers")
    axes[-1].set_title("trained models (band: their training seeds)")
    axes[0].set_ylabel("adjusted loss after k layers")
    _legend(axes[0])
    _legend(axes[-1])
    fig.suptitle(
        "Figure 5: loss after k layers inside one model, σ ~ U(0, 5) "
        "(shaded: min-max over the training seeds)"
    )
    fig.tight_layout()
    return fig


def _base_value(paper_dir, name, column) -> float:
    row = read_baselines(paper_dir).get((name, column))
    return float(row["exact"]) if row is not None else float("nan")


def figure6(paper_dir: pathlib.Path) -> Figure:
    """Unadjusted loss against σ: adjusted profile plus the oracle's own expected loss."""
    columns = ["1", "3", "5", "7"]
    fig, axes = plt.subplots(1, len(columns), figsize=(5 * len(columns), 4.2))
    for ax, column in zip(axes, columns, strict=True):
        base = _baseline(paper_dir, column)
        if base is None:
            _empty(ax)
            continue
        orc = base["profile"]["oracle_unadjusted"]
        sig = base["profile"]["sigma"]
        _training_range(ax, column)
        ax.plot(sig, orc, "k-", label="oracle")
        reference = list(orc)
        for model in MODEL_ROWS:
            data = _cell(paper_dir, Cell(model, 7, column))
            if data is not None:
                ax.plot(
                    sig,
                    [o + v[-1] for o, v in zip(orc, data["profile"]["model"], strict=True)],
                    color=COLORS[model],
                    label=f"{MODEL_ROWS[model]} L=7",
                )
        for name, (label, color) in BASE_STYLE.items():
            vals = base["profile"]["baselines"].get(name)
            if vals:
                total = [o + v for o, v in zip(orc, vals, strict=True)]
                ax.plot(sig, total, ls="--", color=color, label=label)
                reference += total
        ax.set_title(f"σ ~ U(0, {column})")
        ax.set_xlabel("σ")
        ax.set_ylabel("unadjusted loss ½E(ŷ − y_t)²")
        _clip_to(ax, reference)
    _legend(axes[0])
    fig.suptitle("Figure 6: unadjusted loss against σ (log scale; grey: the training range)")
    fig.tight_layout()
    return fig


def figure7(paper_dir: pathlib.Path) -> Figure:
    """Layer-by-layer per-variance profiles inside the deepest model, σ ~ U(0, 5)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, model in zip(axes, MODEL_ROWS, strict=True):
        data = _cell(paper_dir, Cell(model, 7, "5"))
        _training_range(ax, "5")
        if data is None:
            _empty(ax)
        else:
            prof = data["profile"]
            per_layer = list(zip(*prof["model"], strict=True))
            for k, vals in enumerate(per_layer):
                ax.plot(
                    prof["sigma"],
                    vals,
                    color=COLORS[model],
                    alpha=0.25 + 0.75 * (k + 1) / len(per_layer),
                    label=f"after layer {k + 1}",
                )
            inside = [
                v
                for vals in per_layer
                for sg, v in zip(prof["sigma"], vals, strict=True)
                if sg <= 5
            ]
            _clip_to(ax, inside)  # the training range decides the axis, not a spike beyond
        ax.set_yscale("log")
        ax.set_xlabel("σ")
        ax.set_ylabel("adjusted loss")
        ax.set_title(f"{MODEL_ROWS[model]}, 7 layers, σ ~ U(0, 5)")
        _legend(ax)
    fig.suptitle("Figure 7: per-variance profile after each layer")
    fig.tight_layout()
    return fig


def draw_all(paper_dir: pathlib.Path) -> list[pathlib.Path]:
    rows = read_table(paper_dir / "table1.csv")
    out_dir = paper_dir / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in (
        ("figure1.png", lambda: figure1(paper_dir, rows)),
        ("figure2.png", lambda: figure2(paper_dir)),
        ("figure3.png", lambda: figure3(paper_dir)),
        ("figure5.png", lambda: figure5(paper_dir)),
        ("figure6.png", lambda: figure6(paper_dir)),
        ("figure7.png", lambda: figure7(paper_dir)),
    ):
        fig = make()
        fig.savefig(out_dir / name, dpi=80)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def main(argv: list[str] | None = None) -> int:
    assert __doc__ is not None  # the module docstring (None only under python -OO)
    parser = argparse.ArgumentParser(
        prog="python -m analysis.figures", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--paper-dir", default="runs/paper", help="the sweep's results (default runs/paper)"
    )
    parser.add_argument(
        "--figure4-run",
        default=None,
        help="the 4-layer FULL model trained on {1,3} for Figure 4: a run directory or a "
        "weights .npz (default: the sweep's committed <paper-dir>/weights/full-L4-c1_3.npz)",
    )
    args = parser.parse_args(argv)
    paper_dir = pathlib.Path(args.paper_dir)
    if not (paper_dir / "table1.csv").is_file():
        print(
            f"error: {paper_dir / 'table1.csv'} does not exist; run `just sweep` first",
            file=sys.stderr,
        )
        return 2
    for path in draw_all(paper_dir):
        print(f"wrote {path}")
    run4 = pathlib.Path(args.figure4_run or paper_dir / "weights" / "full-L4-c1_3.npz")
    from eqicl import RunDirError, WeightsError, load_model, load_weights

    from ._figures import plot_pq

    try:
        if run4.suffix == ".npz" and run4.is_file():
            model, _ = load_weights(run4)
        elif (run4 / "config.json").is_file():
            model, _ = load_model(run4)
        else:
            print(f"Figure 4 not drawn: {run4} is neither a weights file nor a trained run")
            return 0
    except (RunDirError, WeightsError) as e:
        print(f"error: Figure 4: {e}", file=sys.stderr)
        return 2
    p, q = model.pq()
    print(f"wrote {plot_pq(p, q, paper_dir / 'figures' / 'figure4.png')} (from {run4})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
