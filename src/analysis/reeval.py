"""`python -m analysis.reeval [--paper-dir runs/paper] --seed S --sequences N`: score the
committed Table 1 weights on a fresh test draw, with the plain and the tail-aware estimator.

Each cell's weights (`<paper-dir>/weights/<kind>-L<layers>-<tag>.npz`) are scored on N
sequences of a test seed S of your choice, with two estimates of the same expectation (the
exact adjusted loss, SPEC §5): plain sampling, and importance sampling from eqicl's default
proposal (`eqicl.DEFAULT`, SPEC §9), which reaches the rare sequences that dominate the mean
of an unstable model. Every model of a noise setting is scored on the same sequences.

Writes `<paper-dir>/reeval/seed<S>-n<N>.csv` (one row per cell: the recorded value, both
estimates with their standard errors, the largest per-sequence loss, the share of the mean
carried by the top 0.1 % of sequences, the effective sample size) and `seed<S>-n<N>.md`
(the counts and the worst cells), and prints the summary.

A cell *holds* when the tail-aware estimate is at most the paper's value plus max(10 %,
0.002), its standard error at most 5 % of it (or 0.0002), and no few sequences carry it (the
top 0.1 % carries less than half the mean, or the largest loss is below 0.5); `plain_holds`
applies the same test to the plain estimate.

`--recorded` scores nothing: it judges the `test*` columns that the sweep's last step wrote
into `<paper-dir>/table1.csv` (`eqicl._score.score_table`, test seed 2027 by default) by the
same rule, and writes `<paper-dir>/reeval/recorded-seed<S>-n<N>.{csv,md}`. A row whose
weights changed since it was scored is left out and said (its score is of other weights); a
table kept without its weights (an archived rerun) is judged as recorded, and says so.
"""

import argparse
import math
import pathlib
import sys

from analysis.table import bar

FIELDS = (
    "method",
    "layers",
    "noise",
    "paper",
    "recorded",
    "plain",
    "plain_se",
    "plain_max",
    "plain_top",
    "tail",
    "tail_se",
    "tail_max",
    "tail_top",
    "tail_ess",
    "below_bar",
    "precise",
    "carried",
    "holds",
    "plain_holds",
)


def judge(est: dict, paper: float) -> dict[str, bool]:
    """below_bar / precise / carried / holds for one tail-aware estimate (module docstring)."""
    mean, se = est["mean"], est["se"]
    finite = est["finite"] and math.isfinite(mean)
    below = finite and mean <= bar(paper)
    precise = finite and math.isfinite(se) and (se <= 0.05 * mean or se <= 2e-4)
    carried = (not finite) or (est["top_share"] >= 0.5 and est["max"] >= 0.5)
    return {
        "below_bar": below,
        "precise": precise,
        "carried": carried,
        "holds": below and precise and not carried,
    }


def _g(x: float) -> str:
    return f"{x:.6g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.reeval",
        description="Score the committed Table 1 weights on a fresh test draw (plain and "
        "tail-aware estimates) and write the comparison with the paper.",
    )
    parser.add_argument("--paper-dir", default="runs/paper", help="default runs/paper")
    parser.add_argument("--seed", type=int, default=None, help="the test seed (pick a new one)")
    parser.add_argument(
        "--recorded",
        action="store_true",
        help="score nothing: judge the test columns table1.csv holds (the sweep's own score)",
    )
    parser.add_argument(
        "--sequences", type=int, default=1_000_000, help="per estimate and cell (1,000,000)"
    )
    parser.add_argument("--models", default="all", help="e.g. diag,full (default all)")
    parser.add_argument("--layers", default="all", help="e.g. 3 or 1-7 (default all)")
    parser.add_argument("--noise", default="all", help='e.g. 0,5,"{1;3}" (default all)')
    parser.add_argument("--chunk", type=int, default=50_000, help="sequences per chunk (50,000)")
    parser.add_argument("--out", default=None, help="output stem (default <paper-dir>/reeval/…)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.recorded:
        if args.seed is not None:
            print(
                "error: --recorded judges the recorded score; it takes no --seed", file=sys.stderr
            )
            return 2
        return recorded_main(args)
    if args.seed is None:
        print("error: give --seed S (a new test seed) or --recorded", file=sys.stderr)
        return 2
    for bad, message in (
        (
            not (2 <= args.sequences <= 10**9),
            f"--sequences must be in [2, 1e9], got {args.sequences}",
        ),
        (not (0 <= args.seed < 2**63), f"--seed must be in [0, 2^63), got {args.seed}"),
        (not (1 <= args.chunk <= 10**7), f"--chunk must be in [1, 1e7], got {args.chunk}"),
    ):
        if bad:
            print(f"error: {message}", file=sys.stderr)
            return 2

    import jax

    jax.config.update("jax_enable_x64", True)
    from tqdm import tqdm

    import eqicl
    from eqicl._score import estimate_columns
    from eqicl.sweep import SweepError, parse_cells, read_table, weights_path

    paper_dir = pathlib.Path(args.paper_dir)
    try:
        cells = parse_cells(args.models, args.layers, args.noise)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    recorded = read_table(paper_dir / "table1.csv")
    have = [c for c in cells if weights_path(paper_dir, c).exists()]
    if not have:
        print(f"error: no weights of the selected cells under {paper_dir}/weights", file=sys.stderr)
        return 2
    stem = (
        pathlib.Path(args.out)
        if args.out
        else paper_dir / "reeval" / f"seed{args.seed}-n{args.sequences}"
    )
    table = eqicl.paper_table()
    columns = list(dict.fromkeys(c.column for c in have))  # in the cells' order
    bar_ = tqdm(
        total=2 * args.sequences * len(columns),
        unit="seq",
        unit_scale=True,
        disable=args.no_progress,
        desc="reeval",
    )
    rows = []
    for column in columns:
        group = [c for c in have if c.column == column]
        models = {c.name: eqicl.load_weights(weights_path(paper_dir, c))[0] for c in group}
        base = bar_.n
        bar_.set_postfix_str(f"noise {column}")
        est = eqicl.score_models(
            models,
            column,
            args.seed,
            args.sequences,
            chunk=args.chunk,
            progress=lambda done, base=base: bar_.update(base + done - bar_.n),
        )
        for c in group:
            p, t = est[c.name]["plain"], est[c.name]["tail"]
            paper = table[(c.row, c.layers, c.column)]
            rec = recorded.get(c)
            columns = {**estimate_columns("plain", p), **estimate_columns("tail", t)}
            rec_exact = rec["exact"] if rec else ""
            rows.append(_row(c, _g(paper), rec_exact, columns, f"{t['ess']:.0f}", p, t, paper))
    bar_.close()
    _write(stem, rows, report(rows, args.seed, args.sequences))
    return 0


def _write(stem: pathlib.Path, rows: list[dict], text: str) -> None:
    from eqicl._files import write_csv_atomic, write_text_atomic

    stem.parent.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(stem.with_suffix(".csv"), FIELDS, rows)
    write_text_atomic(stem.with_suffix(".md"), text)
    print(text, end="")
    print(f"wrote {stem}.csv and {stem}.md")


def _row(cell, paper_text, recorded, columns, ess, plain, tail, paper) -> dict:
    """One CSV row: the cell, the paper's value, the recorded one, both estimates' columns
    and the verdicts `judge` gives them (one place for a fresh score and a recorded one)."""
    return {
        "method": cell.row,
        "layers": cell.layers,
        "noise": cell.column,
        "paper": paper_text,
        "recorded": recorded,
        **columns,
        "tail_ess": ess,
        **{k: int(v) for k, v in judge(tail, paper).items()},
        "plain_holds": int(judge(plain, paper)["holds"]),
    }


def _estimate(row: dict, prefix: str) -> dict:
    """A recorded estimate's four columns as the summary `judge` reads."""
    mean = float(row[prefix])
    return {
        "mean": mean,
        "se": float(row[f"{prefix}_se"]),
        "max": float(row[f"{prefix}_max"]),
        "top_share": float(row[f"{prefix}_top"]),
        "finite": math.isfinite(mean),
    }


def recorded_main(args) -> int:
    """`--recorded`: the verdicts on the score table1.csv holds (module docstring)."""
    from eqicl._score import weights_digest
    from eqicl.sweep import SweepError, parse_cells, read_table, weights_path

    paper_dir = pathlib.Path(args.paper_dir)
    try:
        cells = set(parse_cells(args.models, args.layers, args.noise))
        table = read_table(paper_dir / "table1.csv")
    except (SweepError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scored = {c: r for c, r in table.items() if c in cells and r.get("test_seed")}
    if not scored:
        print(f"error: no scored cells of the selection in {paper_dir}/table1.csv", file=sys.stderr)
        return 2
    draws = {(r["test_seed"], r["test_sequences"]) for r in scored.values()}
    if len(draws) > 1:
        print(
            f"error: the selected rows were scored on different draws {sorted(draws)}; "
            "select fewer cells",
            file=sys.stderr,
        )
        return 2
    ((seed, sequences),) = draws

    absent = [c for c in scored if not weights_path(paper_dir, c).is_file()]
    stale = [
        c
        for c in scored
        if c not in absent
        and weights_digest(weights_path(paper_dir, c)) != scored[c]["test_weights"]
    ]
    rows = []
    for cell, r in scored.items():
        if cell in stale:
            continue
        plain, tail = _estimate(r, "test"), _estimate(r, "test_tail")
        columns = {
            **{f"plain{s}": r[f"test{s}"] for s in ("", "_se", "_max", "_top")},
            **{f"tail{s}": r[f"test_tail{s}"] for s in ("", "_se", "_max", "_top")},
        }
        rows.append(_row(cell, r["paper"], r["exact"], columns, "", plain, tail, float(r["paper"])))
    text = report(rows, int(seed), int(sequences), recorded=True)
    if absent:
        text += (
            f"\nNot checked against their weights (no weights file under {paper_dir}/weights): "
            f"{len(absent)} cells\n"
        )
    if stale:
        text += (
            f"\nLeft out, their weights changed since they were scored: "
            f"{', '.join(c.name for c in sorted(stale, key=lambda c: c.name))}\n"
        )
    stem = (
        pathlib.Path(args.out)
        if args.out
        else paper_dir / "reeval" / f"recorded-seed{seed}-n{sequences}"
    )
    _write(stem, rows, text)
    return 0


def report(rows: list[dict], seed: int, sequences: int, recorded: bool = False) -> str:
    """The markdown summary: counts, then the cells that do not hold, worst first."""
    n = len(rows)
    count = {k: sum(int(r[k]) for r in rows) for k in ("below_bar", "precise", "carried", "holds")}
    plain_below = sum(
        1
        for r in rows
        if math.isfinite(float(r["plain"])) and float(r["plain"]) <= bar(float(r["paper"]))
    )
    lines = [
        f"# Table 1 weights on test seed {seed}, {sequences:,} sequences per estimate"
        + (" (the score table1.csv records)" if recorded else ""),
        "",
        f"- cells: {n}; **hold: {count['holds']}** (tail-aware estimate ≤ paper + max(10 %, "
        "0.002), se ≤ 5 % or 0.0002, not carried by a few sequences)",
        f"- tail-aware estimate below the bar: {count['below_bar']}; precise: {count['precise']}; "
        f"carried by the top 0.1 % (share ≥ 0.5 and largest loss ≥ 0.5, or non-finite): "
        f"{count['carried']}",
        f"- plain estimate below the bar: {plain_below}; **the plain estimate holds** (the "
        f"same test on it): {sum(int(r.get('plain_holds', 0)) for r in rows)}",
        "",
        "Cells that do not hold (tail-aware estimate / paper, worst ratio first):",
        "",
        "| cell | paper | recorded | plain ± se (top share, max) | tail-aware ± se (top share, "
        "max) | why |",
        "|---|---|---|---|---|---|",
    ]

    def ratio(r):
        v = float(r["tail"])
        return v / float(r["paper"]) if math.isfinite(v) else math.inf

    bad = sorted((r for r in rows if not int(r["holds"])), key=ratio, reverse=True)
    for r in bad:
        why = [
            k
            for k, flag in (
                ("above bar", not int(r["below_bar"])),
                ("imprecise", not int(r["precise"])),
                ("carried", int(r["carried"])),
            )
            if flag
        ]
        lines.append(
            f"| {r['method']} {r['layers']}L {r['noise']} | {r['paper']} | {r['recorded']} | "
            f"{r['plain']} ± {r['plain_se']} ({r['plain_top']}, {r['plain_max']}) | "
            f"{r['tail']} ± {r['tail_se']} ({r['tail_top']}, {r['tail_max']}) | "
            f"{', '.join(why)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
