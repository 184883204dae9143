"""Command line: `python -m eqicl.sweep [--models ...] [--layers ...] [--noise ...] ...`.

Trains and evaluates the cells of the paper's Table 1 and records them in
`runs/paper/table1.csv` (see eqicl._sweep). Recorded cells are skipped unless `--force`;
an interrupted cell resumes from its checkpoint. Examples:

    python -m eqicl.sweep                                   # all 210 cells
    python -m eqicl.sweep --models diag --layers 1-3 --noise 3,5
    python -m eqicl.sweep --list                            # what would run, and what is done

The recipe (`just sweep`) is two passes and a merge:

    python -m eqicl.sweep --cold --paper-dir runs/paper/cold --run-root runs/sweep/cold --baselines-dir runs/paper
    python -m eqicl.sweep --paper-dir runs/paper/warm --run-root runs/sweep/warm --baselines-dir runs/paper
    python -m eqicl.sweep --merge runs/paper/cold,runs/paper/warm    # into runs/paper

The cold pass starts every cell from the GD initialization. The warm pass starts each cell
from the best (on held-out sequences) of its own recorded cells that embed exactly into it:
one layer fewer of the same kind, or the same depth of GD++ / DIAG. The merge keeps, cell by
cell, the pass with the lower validation loss. Trained weights go to <paper-dir>/weights/.
"""

import argparse
import pathlib
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eqicl.sweep",
        description="Reproduce the paper's Table 1: train, evaluate and record every cell.",
    )
    parser.add_argument("--models", default="all", help="gdpp,diag,full (default: all)")
    parser.add_argument("--layers", default="all", help="e.g. 1-7 or 1,3,5 (default: all)")
    parser.add_argument(
        "--noise", default="all", help="Table 1 columns, e.g. 0,3,{1;3} (default: all ten)"
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="seeds per cell, best one kept (default 1)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per cell (default: 1000 x (layers + 1))",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="config override applied to every cell (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="rerun cells already recorded")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="start every cell from the GD initialization, not from its best recorded "
        "shallower or narrower cell (the recipe's warm start)",
    )
    parser.add_argument(
        "--merge",
        default=None,
        metavar="DIR,DIR",
        help="record in --paper-dir, cell by cell, the best by validation loss of these sweep "
        "passes' results (the recipe's last step); trains nothing",
    )
    parser.add_argument(
        "--baselines-dir", default=None, help="where the baselines go (default: --paper-dir)"
    )
    parser.add_argument("--run-root", default="runs/sweep", help="where cell run directories go")
    parser.add_argument("--paper-dir", default="runs/paper", help="where the committed results go")
    parser.add_argument(
        "--list", action="store_true", help="list the cells and their state, run nothing"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from ._cli import setup_jax

    setup_jax()
    from ._run import RunDirError
    from ._sweep import (
        SweepError,
        cell_config,
        merge,
        parse_cells,
        read_table,
        sweep,
        warm_start,
    )

    try:
        if args.seeds < 1:
            raise SweepError(f"--seeds must be >= 1, got {args.seeds}")
        if args.steps is not None and args.steps < 1:
            raise SweepError(f"--steps must be >= 1, got {args.steps}")
        cells = parse_cells(args.models, args.layers, args.noise)
        paper_dir = pathlib.Path(args.paper_dir)
        if args.merge:
            merge([pathlib.Path(p) for p in args.merge.split(",") if p], paper_dir)
            return 0
        if args.list:
            done = read_table(paper_dir / "table1.csv")
            for cell in cells:
                config = cell_config(cell, args.steps, args.seeds, args.overrides)
                state = "recorded" if cell in done else "to run"
                start = None if args.cold else warm_start(paper_dir, cell, config)
                init = start.name if start else config.model.init
                print(
                    f"{cell.name:<16} {state:<9} steps={config.train.steps} lr={config.train.lr:g} seeds={config.train.seeds} start={init}"
                )
            return 0
        sweep(
            cells,
            pathlib.Path(args.run_root),
            paper_dir,
            args.steps,
            args.seeds,
            args.overrides,
            force=args.force,
            progress=not args.no_progress,
            warm=not args.cold,
            baselines_dir=None if args.baselines_dir is None else pathlib.Path(args.baselines_dir),
        )
    except (SweepError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue the sweep", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
