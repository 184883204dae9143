"""Command line: `python -m eqicl.sweep [--models ...] [--layers ...] [--noise ...] ...`.

Reproduces the paper's Table 1 with one command: every stage of the recipe
(`eqicl._sweep.RECIPE`) for the asked cells, in order, each skipping what it has recorded,
then the table (`runs/paper/table1.csv`, `cells/`, `weights/`) as the best candidate of every
cell by validation loss. Run it again after an interruption, or after adding cells: it goes on
from where it stopped. Examples:

    python -m eqicl.sweep                                   # all 210 cells
    python -m eqicl.sweep --noise 5,{1;3}                   # a part (cells whose inputs
                                                            # are elsewhere wait; rerun later)
    python -m eqicl.sweep --list                            # each stage's candidates, the table's pick
    python -m eqicl.sweep --shard 3/8 --wait 86400          # part 3 of 8 (one machine of 8,
                                                            # sharing the store); then, once
    python -m eqicl.sweep                                   # all are done: the table

The stages: `cold` trains the cells of 1-4 layers, and FULL at every depth, from the GD
initialization; `warm` trains every cell from the best (on its validation sequences) of the
candidates that embed exactly into it (one layer fewer of the same kind, the same depth of
GD++ / DIAG, from either stage) and of the cold candidates of the same model and depth at the
neighbouring noise settings; `polish` refines the best candidate so far of the GD++ and DIAG
cells of at most 3 layers by L-BFGS and offers every cell of at most 3 layers its polished
narrower cells. Candidates live in `runs/paper/candidates/<stage>/`, run directories in
`runs/sweep/<stage>/<cell>`.
"""

import argparse
import pathlib
import sys

# The sweep's files, for the tools that read them (analysis.table, analysis.figures, ...).
from ._sweep import (
    COLUMNS as COLUMNS,
    LAYERS as LAYERS,
    TABLE1 as TABLE1,
    Cell as Cell,
    Lineup as Lineup,
    SweepError as SweepError,
    column_tag as column_tag,
    parse_cells as parse_cells,
    read_baselines as read_baselines,
    read_table as read_table,
    register_lineup as register_lineup,
    run_recipe as run_recipe,
    weights_path as weights_path,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eqicl.sweep",
        description="Reproduce the paper's Table 1: every stage of the recipe for the asked "
        "cells, then the table as each cell's best candidate by validation loss.",
    )
    parser.add_argument("--models", default="all", help="gdpp,diag,full (default: all)")
    parser.add_argument("--layers", default="all", help="e.g. 1-7 or 1,3,5 (default: all)")
    parser.add_argument(
        "--noise", default="all", help="Table 1 columns, e.g. 0,3,{1;3} (default: all ten)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="Adam seeds per cell, best one kept (default: the recipe's, 5 at sigma_max = 5 "
        "for Figure 5's bands, else 1)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Adam steps per cell (default: 1000 x (layers + 1), twice that for FULL from 5 "
        "layers); the polish stage keeps its own L-BFGS settings",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="config override applied to every cell (repeatable)",
    )
    parser.add_argument(
        "--force", action="store_true", help="make the candidates already recorded again"
    )
    parser.add_argument(
        "--run-root", default="runs/sweep", help="where run directories go (runs/sweep)"
    )
    parser.add_argument("--paper-dir", default="runs/paper", help="where results go (runs/paper)")
    parser.add_argument(
        "--list",
        action="store_true",
        help="one line per cell: each stage's validation loss (or to-run / waits / - where "
        "the stage does not cover it) and the stage the table takes; runs and writes nothing",
    )
    parser.add_argument(
        "--test-seed",
        type=int,
        default=2027,
        help="the test seed the table's cells are scored on at the end (2027; used nowhere "
        "in training or selection)",
    )
    parser.add_argument(
        "--test-sequences",
        type=int,
        default=1_000_000,
        help="sequences per estimate of that score (1,000,000; 0: no score)",
    )
    parser.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help="train and score only part K of N of the asked cells (balanced by cost, the same "
        "split on every machine); N such runs on one shared --paper-dir and --run-root make "
        "the whole, and a last run without --shard assembles the table",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --shard: how long in all a cell may wait for inputs another shard makes "
        "(0: cells whose inputs are not recorded yet are left for a later run)",
    )
    parser.add_argument(
        "--cost",
        action="store_true",
        help="what the recorded candidates of the asked cells cost: per stage, cells, training "
        "and evaluation seconds summed over them (one process each), the machines they were "
        "recorded on; runs and writes nothing",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from ._cli import setup_jax

    setup_jax()
    from ._config import ConfigError
    from ._run import RunDirError
    from ._sweep import costs, listing, parse_shard, run_recipe

    try:
        if args.seeds is not None and args.seeds < 1:
            raise SweepError(f"--seeds must be >= 1, got {args.seeds}")
        if args.steps is not None and args.steps < 1:
            raise SweepError(f"--steps must be >= 1, got {args.steps}")
        if not (0 <= args.test_seed < 2**31):
            raise SweepError(f"--test-seed must be in [0, 2^31), got {args.test_seed}")
        if args.test_sequences != 0 and not (2 <= args.test_sequences <= 10**9):
            raise SweepError(
                f"--test-sequences must be 0 (no score) or in [2, 1e9], got {args.test_sequences}"
            )
        shard = parse_shard(args.shard) if args.shard is not None else None
        if not (0 <= args.wait < float("inf")):
            raise SweepError(f"--wait must be a number of seconds >= 0, got {args.wait}")
        if args.wait and shard is None:
            raise SweepError("--wait is for --shard K/N (a whole sweep waits for nobody)")
        cells = parse_cells(args.models, args.layers, args.noise)
        if not cells:
            raise SweepError("no cells selected (check --models, --layers and --noise)")
        paper_dir = pathlib.Path(args.paper_dir)
        if paper_dir.exists() and not paper_dir.is_dir():
            raise SweepError(f"--paper-dir {paper_dir} is not a directory")
        if args.cost:
            for line in costs(cells, paper_dir):
                print(line)
            return 0
        if args.list:
            if shard is not None:  # the cells this shard owns
                from ._sweep import shard_cells

                cells = shard_cells(cells, *shard)
            for line in listing(cells, paper_dir, args.steps, args.seeds, args.overrides):
                print(line)
            return 0
        run_recipe(
            cells,
            paper_dir,
            pathlib.Path(args.run_root),
            args.steps,
            args.seeds,
            args.overrides,
            force=args.force,
            progress=not args.no_progress,
            test_seed=args.test_seed,
            test_sequences=args.test_sequences,
            shard=shard,
            wait=args.wait,
        )
    except (SweepError, RunDirError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --paper-dir a file, a full or read-only disk: one line
        where = f"cannot write {e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # eqicl's Interrupted / Stopped carry the signal
        print("interrupted; rerun the same command to continue the sweep", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
