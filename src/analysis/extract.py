"""Command line: `python -m analysis.extract RUN_DIR [--sequences N] [--sigma S ...] [--seed K]`.

Reads a finished run directory (config.json, eval.json, the latest checkpoint of the selected
seed) and writes RUN_DIR/analysis/extract.json with PNG figures: which algorithm the trained
transformer implements (SPEC §6).
"""

import argparse
import math
import sys


def _sigmas(values: list[str]) -> list[float]:
    out = []
    for value in values:
        for part in value.split(","):
            if part.strip():
                out.append(float(part))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.extract",
        description="Reverse-engineer a trained linear transformer: Theorem 4.1 terms, implicit "
        "regression weights, DIAG coefficients, Lemma 4.4 momentum view, and figures.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished eqicl run directory")
    parser.add_argument(
        "--sequences",
        type=int,
        default=2000,
        help="fresh sequences of the run's task (and per σ value); default 2000",
    )
    parser.add_argument(
        "--sigma",
        nargs="+",
        default=None,
        metavar="S",
        help="noise levels for the per-variance view, e.g. --sigma 0 1 2 3 or "
        "--sigma 0,1,2,3 (default: 7 values up to 1.5 × the training range)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the analysis sequences")
    parser.add_argument("--no-figures", action="store_true", help="write extract.json only")
    args = parser.parse_args(argv)
    if args.sequences < 2:
        parser.error(f"--sequences must be >= 2, got {args.sequences}")
    sigmas = None
    if args.sigma is not None:
        try:
            sigmas = _sigmas(args.sigma)
        except ValueError:
            parser.error(f"--sigma takes numbers, got {' '.join(args.sigma)!r}")
        if not sigmas or any(not (0 <= s < math.inf) for s in sigmas):
            parser.error(f"--sigma values must be finite and >= 0, got {' '.join(args.sigma)!r}")

    if not 0 <= args.seed <= 2**31 - 1:
        print(f"error: --seed must be in [0, 2147483647], got {args.seed:.3g}", file=sys.stderr)
        return 2

    import jax

    jax.config.update("jax_enable_x64", True)
    import eqicl

    from ._run import analyse_run, summary

    try:
        result = analyse_run(
            args.run_dir, args.sequences, sigmas, args.seed, figures=not args.no_figures
        )
    except (eqicl.RunDirError, eqicl.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full file system: one line, no traceback
        where = f"cannot write {e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    print(summary(result))
    print(f"wrote {result['run_dir']}/analysis/extract.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
