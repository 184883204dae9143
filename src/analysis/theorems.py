"""Command line: `python -m analysis.theorems [--out DIR] [--sequences N] [--seed K]`.

Runs the hand-set constructions of the paper's Theorems 5.1 and 5.2 (`eqicl.theorem51_transformer`,
`eqicl.theorem52_transformer`) through the model's forward pass on fresh sequences, in float64,
and writes DIR/theorems.json with DIR/theorem51.png and DIR/theorem52.png (default DIR:
runs/paper/theory).
"""

import argparse
import json
import pathlib
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.theorems",
        description="Theorem 5.1 (GD++ preconditioning) and 5.2 (two noise levels) as "
        "hand-set weights: error against depth, beyond the covered spectrum, distance to "
        "ridge against n; a JSON file and two figures.",
    )
    parser.add_argument("--out", default="runs/paper/theory", help="output directory")
    parser.add_argument(
        "--sequences", type=int, default=20_000, help="sequences for Theorem 5.1 against depth"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sequences")
    args = parser.parse_args(argv)
    if args.sequences < 1000:
        parser.error(f"--sequences must be >= 1000, got {args.sequences}")

    from eqicl import setup_jax
    from eqicl._limits import machine_line

    setup_jax()
    from ._theorems import (
        plot_theorem51,
        plot_theorem52,
        theorem51_beyond,
        theorem51_depth,
        theorem52_vs_n,
    )

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    depth = theorem51_depth(sequences=args.sequences, seed=args.seed)
    beyond = theorem51_beyond(seed=args.seed + 1)
    two = theorem52_vs_n(seed=args.seed + 2)
    seconds = time.perf_counter() - t0
    plot_theorem51(depth, beyond, out / "theorem51.png")
    plot_theorem52(two, out / "theorem52.png")
    beyond = {k: v for k, v in beyond.items() if k != "points"}
    result = {
        "theorem51_depth": depth,
        "theorem51_beyond": beyond,
        "theorem52": two,
        "seconds": round(seconds, 1),
        "machine": machine_line(),
    }
    (out / "theorems.json").write_text(json.dumps(result, indent=1) + "\n")
    print(_summary(result))
    print(f"wrote {out}/theorems.json, theorem51.png, theorem52.png ({seconds:.0f} s)")
    return 0


def _summary(result: dict) -> str:
    lines = []
    for cv in result["theorem51_depth"]["covers"].values():
        lines.append(f"Theorem 5.1, Λ₀ = {cv['lam_cover']:g} (covers {cv['covered_share']:.2%}):")
        for r in cv["depth"]:
            a = r["all"]
            lines.append(
                f"  {r['layers']:2d} layers: mean {a['mean']:.3e} ± {a['se']:.1e} "
                f"(N = {a['sequences']}), max {a['max']:.2e}, top 0.1 % share "
                f"{a['top_share']:.2f}; covered mean {r['covered']['mean']:.3e}"
            )
    for name, band in result["theorem51_beyond"]["bands"].items():
        if band:
            lines.append(
                f"Theorem 5.1 beyond, {name}: mean {band['mean']:.3e} (N = {band['sequences']}), "
                f"median {band['median']:.2e}, max {band['max']:.2e}"
            )
    for regime, rows in result["theorem52"]["regimes"].items():
        for r in rows:
            if "at" not in r:
                lines.append(f"Theorem 5.2 {regime} n = {r['n']}: {r['error']}")
                continue
            parts = [
                f"σ = {a['sigma']:.3g}: construction {a['construction']['mean']:.4f} ± "
                f"{a['construction']['se']:.4f}, OLS {a['ols']['mean']:.4f}, other ridge "
                f"{a['other_ridge']['mean']:.4f}"
                for a in r["at"]
            ]
            lines.append(f"Theorem 5.2 {regime} n = {r['n']}: " + "; ".join(parts))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
