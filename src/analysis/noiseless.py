"""Command line: `python -m analysis.noiseless [--out runs/paper/noiseless] [--typical N]
[--large M] [--seed K]`.

The noiseless column for GD++ (issue 18, item 2): for the trained cells gdpp-L4..7-u0 and
for their coefficients refitted (L-BFGS, exact gradient) on a typical draw of N sequences,
the loss on that draw beside the estimate on M fresh sequences and its tail. The loss is the
noiseless one averaged over w_τ, a function of each sequence's spectrum alone
(`analysis._noiseless`). Writes DIR/noiseless.json.
"""

import argparse
import json
import pathlib
import sys
import time

PAPER = {4: 9.91e-05, 5: 1.14e-07, 6: 2.37e-10, 7: 2.65e-12}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.noiseless")
    parser.add_argument("--out", default="runs/paper/noiseless")
    parser.add_argument("--weights", default="runs/paper/weights")
    parser.add_argument("--typical", type=int, default=100_000, help="the test-size draw")
    parser.add_argument("--large", type=int, default=1_000_000, help="the tail estimate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from eqicl import setup_jax

    setup_jax()
    import jax.random as jr
    import numpy as np

    import eqicl

    from ._noiseless import fit, score, spectra

    t0 = time.perf_counter()
    key = jr.key(args.seed)
    typical = spectra(jr.fold_in(key, 0), args.typical)
    large = spectra(jr.fold_in(key, 1), args.large)
    rows = []
    for layers in sorted(PAPER):
        model, _ = eqicl.load_weights(pathlib.Path(args.weights) / f"gdpp-L{layers}-u0.npz")
        coef = np.asarray(model.coefficients(), np.float64)[:, [0, 2]]
        refit, info = fit(coef, typical)
        rows.append(
            {
                "layers": layers,
                "paper": PAPER[layers],
                "trained": {
                    "coef": coef.tolist(),
                    "typical": score(coef, typical),
                    "large": score(coef, large),
                },
                "refit_on_typical": {
                    "coef": refit.tolist(),
                    "fit": info,
                    "typical": score(refit, typical),
                    "large": score(refit, large),
                },
            }
        )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "typical_sequences": args.typical,
        "large_sequences": args.large,
        "seed": args.seed,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": "2-core AMD EPYC Zen 5 (CPU), float64",
    }
    (out / "noiseless.json").write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        for name in ("trained", "refit_on_typical"):
            t, g = r[name]["typical"], r[name]["large"]
            print(
                f"GD++ {r['layers']}L {name:>16}: typical {t['mean']:.3g} ± {t['se']:.2g} "
                f"(median {t['median']:.3g}) | {g['sequences']:,}: {g['mean']:.3g} ± "
                f"{g['se']:.2g}, max {g['max']:.3g}, top 0.1 % {g['top_share']:.2f} | "
                f"paper {r['paper']:.3g}"
            )
    print(f"wrote {out}/noiseless.json ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
