"""Command line: `python -m analysis.noiseless [--paper-dir runs/paper] [--out DIR]
[--typical N] [--large M] [--seed S] [--alphas A,...] [--no-cells] [--no-progress]`.

The noiseless column (σ_max = 0; issue 18, item 2), in two parts.

**Every σ_max = 0 cell** of the table (`<paper-dir>/weights/*-u0.npz`, GD++, DIAG and FULL):
the exact adjusted loss on a typical draw of N sequences (the paper's test size, test seed
S + 1) beside the plain estimate on M fresh sequences (test seed S) and the tail-aware one
(eqicl's default proposal, SPEC §9), each with its standard error, largest per-sequence loss
and the share of the mean carried by the top 0.1 % (`eqicl.score_models`).

**The trade-off for GD++** (3–7 layers): without noise a GD++ model's loss averaged over
w_τ is a function of the spectrum of Σ alone (`analysis._noiseless`), so its coefficients
can be refitted exactly. Each depth is refitted (L-BFGS, exact gradient, from the trained
cell) to log((1 − α)·mean on a typical draw + α·tail-aware estimate on a proposal draw) for
each α of `--alphas`, from α = 0 (the typical draw alone) to α = 1 (the expectation alone),
each from the trained cell and from the previous α's fit (the lower objective on the fit
draws is kept), and every fit is scored on its typical draw, on M fresh plain sequences and on M
fresh tail-aware ones. So the figure shows what a model fitted to typical spectra gains
there and pays in expectation.

Writes DIR/noiseless.json (every number), DIR/noiseless.md (the two tables) and
DIR/noiseless.png; DIR defaults to `<paper-dir>/noiseless`.
"""

import argparse
import json
import math
import pathlib
import sys
import time

LAYERS = (3, 4, 5, 6, 7)


def _alphas(text: str) -> list[float]:
    values = sorted({float(a) for a in text.split(",") if a.strip()})
    if not values or any(not (0.0 <= a <= 1.0) for a in values):
        raise ValueError(f"--alphas must be numbers in [0, 1], got {text!r}")
    return values


def _e(est: dict) -> str:
    """mean ± se (largest loss, top-0.1 % share) of a summary."""
    if not est["finite"]:
        return "not finite"
    return f"{est['mean']:.3g} ± {est['se']:.2g} ({est['max']:.3g}, {est['top_share']:.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.noiseless",
        description="The noiseless column: every sigma_max = 0 cell on a typical draw beside "
        "its expectation, and GD++'s trade-off between the two.",
    )
    parser.add_argument("--paper-dir", default="runs/paper", help="default runs/paper")
    parser.add_argument("--out", default=None, help="default <paper-dir>/noiseless")
    parser.add_argument("--typical", type=int, default=100_000, help="typical draw (100,000)")
    parser.add_argument("--large", type=int, default=1_000_000, help="per estimate (1,000,000)")
    parser.add_argument("--seed", type=int, default=2030, help="test seed (2030; S+1 too)")
    parser.add_argument("--alphas", default="0,1e-4,1e-3,1e-2,0.1,1", help="trade-off weights")
    parser.add_argument("--no-cells", action="store_true", help="skip the per-cell table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        alphas = _alphas(args.alphas)
        for name in ("typical", "large"):
            if not (2 <= getattr(args, name) <= 10**8):
                raise ValueError(f"--{name} must be in [2, 1e8], got {getattr(args, name)}")
        if not (0 <= args.seed < 2**62):
            raise ValueError(f"--seed must be in [0, 2^62), got {args.seed}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paper_dir = pathlib.Path(args.paper_dir)
    weights = paper_dir / "weights"
    missing = [L for L in LAYERS if not (weights / f"gdpp-L{L}-u0.npz").is_file()]
    if missing:
        print(f"error: no GD++ weights gdpp-L{missing[0]}-u0.npz under {weights}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out) if args.out else paper_dir / "noiseless"

    from eqicl import setup_jax

    setup_jax()
    import jax.random as jr
    import numpy as np
    from tqdm import tqdm

    import eqicl
    from eqicl._files import atomic_write
    from eqicl._limits import machine_line
    from eqicl._score import weights_digest
    from eqicl.sweep import Cell, weights_path

    from ._noiseless import fit, proposal_spectra, score, spectra

    paper = eqicl.paper_table()
    t0 = time.perf_counter()
    cells = []
    if not args.no_cells:
        have = [
            Cell(m, L, "0")
            for m in ("gdpp", "diag", "full")
            for L in range(1, 8)
            if weights_path(paper_dir, Cell(m, L, "0")).is_file()
        ]
        models = {c.name: eqicl.load_weights(weights_path(paper_dir, c))[0] for c in have}
        total = 2 * (args.typical + args.large)
        with tqdm(total=total, unit="seq", unit_scale=True, disable=args.no_progress) as bar:
            bar.set_postfix_str("every σ0 cell")
            typical = eqicl.score_models(
                models, "0", args.seed + 1, args.typical, progress=lambda k: bar.update(k - bar.n)
            )
            large = eqicl.score_models(
                models,
                "0",
                args.seed,
                args.large,
                progress=lambda k: bar.update(2 * args.typical + k - bar.n),
            )
        for c in have:
            cells.append(
                {
                    "cell": c.name,
                    "method": c.row,
                    "layers": c.layers,
                    "paper": paper[(c.row, c.layers, "0")],
                    "weights": weights_digest(weights_path(paper_dir, c)),
                    "typical": typical[c.name]["plain"],
                    "plain": large[c.name]["plain"],
                    "tail": large[c.name]["tail"],
                }
            )
    cells_seconds = time.perf_counter() - t0

    key = jr.key(args.seed)
    fit_plain = spectra(jr.fold_in(key, 0), args.typical)
    fit_tail, fit_tail_w = proposal_spectra(
        spectra(jr.fold_in(key, 1), args.typical), eqicl.DEFAULT
    )
    test_plain = spectra(jr.fold_in(key, 2), args.large)
    test_tail, test_tail_w = proposal_spectra(
        spectra(jr.fold_in(key, 3), args.large), eqicl.DEFAULT
    )

    def scores(coef) -> dict:
        return {
            "typical": score(coef, fit_plain),
            "plain": score(coef, test_plain),
            "tail": score(coef, test_tail, test_tail_w),
        }

    rows = []
    for layers in tqdm(LAYERS, desc="GD++ trade-off", disable=args.no_progress):
        model, _ = eqicl.load_weights(weights / f"gdpp-L{layers}-u0.npz")
        coef = np.asarray(model.coefficients(), np.float64)[:, [0, 2]]
        row = {
            "layers": layers,
            "paper": paper[("GD++", layers, "0")],
            "trained": {"coef": coef.tolist(), **scores(coef)},
            "fits": [],
        }
        previous = None
        for alpha in alphas:
            # from the trained cell and from the previous α's fit; the lower objective (on
            # the fit draws) wins: a fit whose tail objective is not finite cannot move
            starts = [("trained", coef)] + (
                [("previous α", previous)] if previous is not None else []
            )
            fits = [
                (fit(c, fit_tail, log_weights=fit_tail_w, alpha=alpha, plain=fit_plain), name)
                for name, c in starts
            ]
            (refit, info), name = min(fits, key=lambda f: f[0][1]["objective"])
            info = info | {"start": name}
            row["fits"].append(
                {"alpha": alpha, "coef": refit.tolist(), "fit": info, **scores(refit)}
            )
            previous = refit
        rows.append(row)

    result = {
        "machine": machine_line(),
        "seed": args.seed,
        "typical_sequences": args.typical,
        "large_sequences": args.large,
        "proposal": {
            "x_scales": eqicl.DEFAULT.x_scales,
            "shares": eqicl.DEFAULT.shares,
        },
        "cells": cells,
        "gdpp_tradeoff": rows,
        "seconds": {
            "cells": round(cells_seconds, 1),
            "tradeoff": round(time.perf_counter() - t0 - cells_seconds, 1),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "noiseless.json") as f:
        f.write(json.dumps(result, indent=1) + "\n")
    text = report(result)
    with atomic_write(out / "noiseless.md") as f:
        f.write(text)
    figure(result, out / "noiseless.png")
    print(text, end="")
    print(f"wrote {out}/noiseless.json, noiseless.md and noiseless.png")
    return 0


def report(result: dict) -> str:
    n, m, s = result["typical_sequences"], result["large_sequences"], result["seed"]
    lines = ["# The noiseless column (σ_max = 0): typical draw against the expectation", ""]
    if result["cells"]:
        lines += [
            f"Every σ_max = 0 cell: the exact loss on a typical draw of {n:,} sequences (test "
            f"seed {s + 1}) and on {m:,} fresh sequences of seed {s}, plainly and tail-aware; "
            "mean ± se (largest per-sequence loss, share of the top 0.1 %).",
            "",
            f"| cell | paper | typical {n:,} | plain {m:,} | tail-aware {m:,} | typical / paper |",
            "|---|---|---|---|---|---|",
        ]
        for c in result["cells"]:
            ratio = c["typical"]["mean"] / c["paper"]
            lines.append(
                f"| {c['method']} {c['layers']}L | {c['paper']:.3g} | {_e(c['typical'])} | "
                f"{_e(c['plain'])} | {_e(c['tail'])} | {ratio:.3g} |"
            )
        lines.append("")
    lines += [
        "GD++ refitted to log((1 − α)·typical mean + α·tail-aware mean) (fit draws of "
        f"{n:,} sequences each), from the trained cell or the previous α's fit; scored on "
        f"the typical fit draw, {m:,} fresh plain and as many fresh tail-aware sequences.",
        "",
        "| layers | paper | model | typical (fit draw) | plain, fresh | tail-aware, fresh |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["gdpp_tradeoff"]:
        entries = [("trained", r["trained"])] + [(f"α = {f['alpha']:g}", f) for f in r["fits"]]
        for name, e in entries:
            lines.append(
                f"| {r['layers']} | {r['paper']:.3g} | {name} | {_e(e['typical'])} | "
                f"{_e(e['plain'])} | {_e(e['tail'])} |"
            )
    return "\n".join(lines) + "\n"


def figure(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eqicl._files import atomic_write

    rows = result["gdpp_tradeoff"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    layers = [r["layers"] for r in rows]

    def mean(e):
        return e["mean"] if e["finite"] else math.nan

    left.semilogy(layers, [r["paper"] for r in rows], "k*--", label="paper")
    for name, pick, style in (
        ("trained", lambda r: r["trained"], "o-"),
        ("fit to the typical draw (α = 0)", lambda r: r["fits"][0], "s-"),
        (
            f"fit to the expectation (α = {rows[0]['fits'][-1]['alpha']:g})",
            lambda r: r["fits"][-1],
            "^-",
        ),
    ):
        line = left.semilogy(
            layers, [mean(pick(r)["typical"]) for r in rows], style, label=f"{name}: typical draw"
        )
        left.semilogy(
            layers,
            [mean(pick(r)["tail"]) for r in rows],
            style.replace("-", ":"),
            color=line[0].get_color(),
            mfc="none",
            label=f"{name}: expectation",
        )
    left.set_xlabel("layers")
    left.set_ylabel("noiseless loss")
    left.set_title("GD++, σ_max = 0")
    left.legend(fontsize=7)
    for r in rows:
        x = [mean(f["typical"]) for f in r["fits"]]
        y = [mean(f["tail"]) for f in r["fits"]]
        line = right.loglog(x, y, "o-", label=f"{r['layers']} layers")
        c = line[0].get_color()
        for f, xi, yi in zip(r["fits"], x, y, strict=True):
            right.annotate(f"{f['alpha']:g}", (xi, yi), fontsize=6, color=c)
        right.axvline(r["paper"], color=c, ls="--", lw=0.8)
    right.set_xlabel("typical draw (fit draw); dashed: the paper's value")
    right.set_ylabel("expectation (tail-aware, fresh)")
    right.set_title("refits over α: typical draw against expectation")
    right.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
