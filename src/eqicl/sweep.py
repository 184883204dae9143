"""Command line: `python -m eqicl.sweep [--models ...] [--layers ...] [--noise ...] ...`.

Trains and evaluates the cells of the paper's Table 1 and records them in
`runs/paper/table1.csv` (see eqicl._sweep). Recorded cells are skipped unless `--force`;
an interrupted cell resumes from its checkpoint. Examples:

    python -m eqicl.sweep                                   # all 210 cells
    python -m eqicl.sweep --models diag --layers 1-3 --noise 3,5
    python -m eqicl.sweep --list                            # what would run, and what is done

The recipe (`just sweep`) is two passes, a merge, a polish pass and the merge again:

    python -m eqicl.sweep --cold --max-layers 4,full:7 --paper-dir runs/paper/cold --run-root runs/sweep/cold --baselines-dir runs/paper
    python -m eqicl.sweep --starts-from runs/paper/cold --across-noise --paper-dir runs/paper/warm --run-root runs/sweep/warm --baselines-dir runs/paper
    python -m eqicl.sweep --merge runs/paper/cold,runs/paper/warm    # into runs/paper
    python -m eqicl.sweep --polish runs/paper --max-layers 3 --paper-dir runs/paper/polish
    python -m eqicl.sweep --merge runs/paper/cold,runs/paper/warm,runs/paper/polish

The cold pass starts every cell of 1-4 layers, and FULL at every depth, from the GD
initialization. The warm pass starts
each cell from the best (on held-out sequences) of the recorded cells of either pass that embed
exactly into it: one layer fewer of the same kind, or the same depth of GD++ / DIAG; with
--across-noise also the same model and depth of the cold pass at the neighbouring noise
settings, scored on the cell's own validation sequences. So a cell can leave a bad basin by
starting where a cold cell found a good one. The merge keeps, cell by cell, the pass with the
lower validation loss. The polish pass refines the merged GD++ and DIAG cells of at most 3
layers by L-BFGS on a fixed sample (eqicl._polish), from their weights and from 3 perturbed
copies: Adam leaves them in local minima that this escapes; every cell of at most 3 layers,
FULL included, also gets its polished narrower cells as candidates. Trained weights go to
<paper-dir>/weights/. Run the cold pass first: the warm pass reads its results.
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
        "--max-layers",
        default=None,
        metavar="N[,MODEL:M]",
        help="only the asked cells with at most N layers, MODEL at most M "
        "(the recipe's cold pass: 4,full:7)",
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="seeds per cell, best one kept (default 1)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per cell (default: 1000 x (layers + 1), twice that for FULL from 5 layers)",
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
        "--starts-from",
        default="",
        metavar="DIR,DIR",
        help="also start cells from the cells recorded in these finished passes' directories "
        "(the recipe's warm pass: --starts-from runs/paper/cold)",
    )
    parser.add_argument(
        "--across-noise",
        action="store_true",
        help="also start a cell from the same model and depth of the neighbouring noise "
        "settings recorded in --starts-from, scored on the cell's own validation sequences",
    )
    parser.add_argument(
        "--merge",
        default=None,
        metavar="DIR,DIR",
        help="record in --paper-dir, cell by cell, the best by validation loss of these sweep "
        "passes' results (the recipe's last step); trains nothing",
    )
    parser.add_argument(
        "--polish",
        default=None,
        metavar="DIR",
        help="a polish pass: each asked cell recorded in DIR (the recipe: the merge, "
        "runs/paper), GD++ and DIAG refined by L-BFGS from its weights and 3 perturbed "
        "copies, every cell also started from its polished narrower cells; the best on its "
        "validation sequences recorded in --paper-dir (--steps: L-BFGS iterations, default "
        "50; --seeds does not apply); trains nothing with Adam",
    )
    parser.add_argument(
        "--baselines-dir", default=None, help="where the baselines go (default: --paper-dir)"
    )
    parser.add_argument("--run-root", default="runs/sweep", help="where cell run directories go")
    parser.add_argument("--paper-dir", default="runs/paper", help="where the committed results go")
    parser.add_argument(
        "--list",
        action="store_true",
        help="list the cells and their state (with --merge: the pass each cell would come from), run and write nothing",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from ._cli import setup_jax

    setup_jax()
    from ._config import ConfigError
    from ._run import RunDirError
    from ._sweep import (
        POLISH_ITERATIONS,
        SweepError,
        cell_config,
        depth_limit,
        merge,
        merge_choices,
        parse_cells,
        polish_pass,
        read_table,
        start_name,
        sweep,
        warm_start,
    )

    try:
        if args.seeds < 1:
            raise SweepError(f"--seeds must be >= 1, got {args.seeds}")
        if args.steps is not None and args.steps < 1:
            raise SweepError(f"--steps must be >= 1, got {args.steps}")
        cells = parse_cells(args.models, args.layers, args.noise)
        if args.max_layers is not None:
            cells = list(filter(depth_limit(args.max_layers), cells))
        paper_dir = pathlib.Path(args.paper_dir)
        starts_from = [pathlib.Path(p) for p in args.starts_from.split(",") if p]
        if args.cold and starts_from:
            raise SweepError("--cold starts every cell from GD: it takes no --starts-from")
        if args.across_noise and not starts_from:
            raise SweepError("--across-noise takes its starts from --starts-from DIR")
        for p in starts_from:
            if not (p / "table1.csv").is_file():
                raise SweepError(f"--starts-from {p}: no table1.csv there (run that pass first)")
        if args.merge:
            passes = [pathlib.Path(p) for p in args.merge.split(",") if p]
            if args.list:  # what the merge would take, writing nothing
                tables, choices = merge_choices(passes)
                for cell, best, losses in choices:
                    scores = " ".join(
                        f"{p.name}={losses[p]:.6g}" if cell in tables[p] else f"{p.name}=-"
                        for p in passes
                    )
                    print(f"{cell.name:<16} from {best.name:<8} validation {scores}")
                return 0
            merge(passes, paper_dir)
            return 0
        if args.polish:
            if args.cold or starts_from:
                raise SweepError("--polish starts from recorded cells: no --cold/--starts-from")
            if args.list:
                source = pathlib.Path(args.polish)
                have = read_table(source / "table1.csv")
                done = read_table(paper_dir / "table1.csv")
                for cell in cells:
                    state = (
                        "polished"
                        if cell in done
                        else "to polish"
                        if cell in have
                        else f"not in {source}"
                    )
                    print(f"{cell.name:<16} {state}")
                return 0
            polish_pass(
                pathlib.Path(args.polish),
                cells,
                paper_dir,
                iterations=args.steps or POLISH_ITERATIONS,
                extra=args.overrides,
                force=args.force,
                progress=not args.no_progress,
            )
            return 0
        if args.list:
            done = read_table(paper_dir / "table1.csv")
            for cell in cells:
                config = cell_config(cell, args.steps, args.seeds, args.overrides)
                now = {
                    "steps": config.train.steps,
                    "lr": config.train.lr,
                    "seeds": config.train.seeds,
                }
                if cell in done:  # what it was recorded with
                    row = done[cell]
                    state, init = "recorded", row["init"] or "?"
                    shown = {k: float(row[k]) for k in now}
                    changed = [f"{k}={v:g}" for k, v in now.items() if shown[k] != v]
                    after = f" (asked now: {' '.join(changed)})" if changed else ""
                else:
                    state, shown, after = "to run", now, ""
                    start = None
                    if not args.cold:
                        start = warm_start(paper_dir, cell, config, starts_from, args.across_noise)
                    init = start_name(start) if start else config.model.init
                values = " ".join(f"{k}={v:g}" for k, v in shown.items())
                print(f"{cell.name:<16} {state:<9} {values} start={init}{after}")
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
            starts_from=starts_from,
            across_noise=args.across_noise,
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
