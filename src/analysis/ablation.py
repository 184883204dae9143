"""Command line: `python -m analysis.ablation [--train] [--layers 2-7] [--noise all] ...`.

What each of DIAG's mechanisms buys (`analysis._ablation`): DIAG with its four coefficients
free per layer ("DIAG-4"), with w_xy ≡ 0 (no momentum: by Theorem 4.1 the buffer u stays 0),
with w_yy ≡ 0 (no adaptive rescaling), and with both (GD++'s function class).

- Without `--train`: the trained Table 1 DIAG models (`--paper-dir`/weights) with each
  mechanism removed at test time, beside the same cell's trained GD++ (`test_time.csv`,
  `test_time.png` in `--out`).
- With `--train`: each variant trained as the recipe trains a DIAG cell of that depth and
  noise setting (its steps, rate and units, one seed; the shallowest depth from the GD start,
  each deeper one from the one before with an identity layer in front), into `--run-root`
  (resumable: run it again), then scored (`trained.csv`, `trained.png`).
- With `--recipe`: each variant trained by the Table 1 recipe itself (`eqicl.sweep.run_recipe`
  on the variants' lineup, `analysis._ablation.LINEUP`: the four stages, the Figure 5
  column's 5 seeds, every choice on validation sequences; 1 layer up to the deepest asked,
  since each depth starts from the one before), into the sweep directory `--sweep-dir`
  (candidates, table1.csv, weights; resumable) and `--run-root`, then scored (`recipe.csv`,
  `recipe.png`).

Rows of cells not asked now are kept from an earlier table, so a study can grow setting by
setting (`--noise 5`, then `--noise 0,1`, ...) into one table and figure.

Every row: the plain estimate on `--sequences` sequences of the test seed `--seed` (2029, used
by nothing else) with its standard error, largest loss and top-0.1 % share, and the tail-aware
estimate on as many; the paper's DIAG value of the cell beside it.
"""

import argparse
import pathlib
import sys


def _plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eqicl.sweep import COLUMNS

    columns = [c for c in COLUMNS if any(r["noise"] == c for r in rows)]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cols = min(5, len(columns))
    nrows = -(-len(columns) // cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(max(3.2 * cols, 7.0), 2.8 * nrows + 1.2), squeeze=False, sharex=True
    )
    for ax, column in zip(axes.flat, columns, strict=False):
        here = [r for r in rows if r["noise"] == column]
        for v in variants:
            pts = sorted((int(r["layers"]), r) for r in here if r["variant"] == v)
            if not pts:
                continue
            xs = [x for x, _ in pts]
            ys = [float(r["plain"]) for _, r in pts]
            es = [float(r["plain_se"]) for _, r in pts]
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=v)
        paper = sorted({(int(r["layers"]), float(r["paper"])) for r in here if r["paper"]})
        if paper:
            ax.plot(*zip(*paper, strict=True), "k--", lw=0.8, label="paper DIAG")
        ax.set_yscale("log")
        label = f"σ ~ U(0, {column})" if column.isdigit() else f"σ ∈ {column}"
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("layers")
    for ax in axes.flat[len(columns) :]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("adjusted loss (plain estimate)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.ablation",
        description="What DIAG's momentum (w_xy) and adaptive rescaling (w_yy) buy: removed at "
        "test time from the Table 1 models, or (--train) trained without them.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--train", action="store_true", help="train the variants (else: test time)")
    mode.add_argument(
        "--recipe", action="store_true", help="train the variants with the Table 1 recipe"
    )
    parser.add_argument(
        "--paper-dir", default="runs/paper", help="the Table 1 weights (runs/paper)"
    )
    parser.add_argument("--out", default=None, help="results directory (<paper-dir>/ablation)")
    parser.add_argument(
        "--run-root",
        default=None,
        help="with --train: runs and weights (runs/ablation); with --recipe: the sweep's runs "
        "(runs/sweep-ablation)",
    )
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="with --recipe: train and record the variants, score and write nothing else (one "
        "of several processes on disjoint noise settings; `just ablation-recipe`)",
    )
    parser.add_argument(
        "--sweep-dir",
        default="runs/ablation-recipe",
        help="with --recipe: the sweep's candidates, table and weights (runs/ablation-recipe)",
    )
    parser.add_argument("--layers", default="2-7", help="depths, e.g. 2-7 or 3,5 (2-7)")
    parser.add_argument("--noise", default="all", help='Table 1 columns, e.g. 5,"{1;3}" (all)')
    parser.add_argument("--sequences", type=int, default=100_000, help="per estimate (100,000)")
    parser.add_argument("--seed", type=int, default=None, help="the test seed (2029)")
    parser.add_argument(
        "--steps", type=int, default=None, help="with --train: Adam steps (recipe's)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="with --train: config override for every variant's run (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not (2 <= args.sequences <= 10**9):
        print(f"error: --sequences must be in [2, 1e9], got {args.sequences}", file=sys.stderr)
        return 2
    if args.steps is not None and args.steps < 1:
        print(f"error: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    if args.train_only and not args.recipe:
        print("error: --train-only is for --recipe", file=sys.stderr)
        return 2
    if not (args.train or args.recipe) and (args.steps is not None or args.overrides):
        print("error: --steps and --set are for --train and --recipe", file=sys.stderr)
        return 2

    import jax

    jax.config.update("jax_enable_x64", True)
    from tqdm import tqdm

    from eqicl._config import ConfigError
    from eqicl._files import write_csv_atomic
    from eqicl.sweep import SweepError, parse_cells, weights_path

    from . import _ablation as ab

    seed = ab.SEED if args.seed is None else args.seed
    paper_dir = pathlib.Path(args.paper_dir)
    out = pathlib.Path(args.out) if args.out else paper_dir / "ablation"
    try:
        cells = parse_cells("diag", args.layers, args.noise)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    columns = list(dict.fromkeys(c.column for c in cells))
    depths = sorted({c.layers for c in cells})
    bar = tqdm(unit="seq", unit_scale=True, disable=args.no_progress, desc="ablation")

    last = [0]  # score_models counts sequences done from 0 on every call

    def tick(done, bar=bar, last=last):
        bar.update(done - last[0] if done >= last[0] else done)
        last[0] = done

    try:
        if args.recipe:
            from eqicl.sweep import run_recipe

            sweep_dir = pathlib.Path(args.sweep_dir)
            if sweep_dir.exists() and not sweep_dir.is_dir():
                raise SweepError(f"--sweep-dir {sweep_dir} is not a directory")
            train_cells = parse_cells(
                "all", f"1-{max(depths)}", ",".join(columns), lineup=ab.LINEUP
            )
            bar.write(f"the Table 1 recipe on {len(train_cells)} variant cells into {sweep_dir}")
            run_recipe(
                train_cells,
                sweep_dir,
                pathlib.Path(args.run_root or "runs/sweep-ablation"),
                steps=args.steps,
                extra=args.overrides,
                echo=bar.write,
                progress=not args.no_progress,
                test_sequences=0,  # scored below on the ablation's own test seed
            )
            if args.train_only:
                return 0
            rows = ab.recipe_rows(sweep_dir, columns, depths, args.sequences, seed, tick=tick)
            stem, title = "recipe", "DIAG's mechanisms removed, trained by the Table 1 recipe"
        elif args.train:
            root = pathlib.Path(args.run_root or "runs/ablation")
            rows = ab.trained(
                root,
                columns,
                depths,
                list(ab.ABLATIONS.values()),
                args.sequences,
                seed,
                args.steps,
                args.overrides,
                echo=bar.write,
                tick=tick,
            )
            stem, title = "trained", "DIAG's mechanisms removed in training"
        else:
            have = [c for c in cells if weights_path(paper_dir, c).is_file()]
            if not have:
                print(
                    f"error: no DIAG weights of those cells in {paper_dir}/weights", file=sys.stderr
                )
                return 2
            rows = ab.test_time(paper_dir, have, args.sequences, seed, tick=tick)
            stem, title = "test_time", "DIAG's mechanisms removed from the trained Table 1 models"
    except (ConfigError, SweepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    # The rows of other cells already in the table stay (a study grows setting by setting).
    asked = {(str(c.layers), c.column) for c in cells}
    if (out / f"{stem}.csv").is_file():
        import csv

        with open(out / f"{stem}.csv", newline="") as f:
            kept = [r for r in csv.DictReader(f) if (r["layers"], r["noise"]) not in asked]
        rows = kept + rows
    write_csv_atomic(out / f"{stem}.csv", ab.FIELDS, rows)
    _plot(rows, out / f"{stem}.png", f"{title} (test seed {seed}, {args.sequences} sequences)")
    print(f"wrote {out / f'{stem}.csv'} ({len(rows)} rows) and {out / f'{stem}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
