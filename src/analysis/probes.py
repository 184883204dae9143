"""Command line: `python -m analysis.probes SOURCE [SOURCE ...] [--out DIR] [--sequences N]
[--families n,kappa,sigma,law] [--seed K]`.

SOURCE is a finished run directory or a weights file written by `eqicl.save_weights` (a Table 1
cell's `runs/paper/weights/<kind>-L<layers>-<u0..u7|c1_3|c1_3_5>.npz`, whose name gives its
training task), or a probe result DIR/<name>.json, whose figure is then redrawn. Each model and the baselines are scored on the same fresh sequences of every
probe (`analysis._probes.default_probes`): context lengths n = 5 … 80, covariates
x ~ N(0, Σ_x) with condition number κ = 1 … 100, σ fixed from 0 to twice the training range,
and four noise laws. Writes DIR/<name>.json, DIR/<name>.png and the table DIR/probes.csv (all
models in DIR). Default DIR: RUN_DIR/analysis/probes, or runs/paper/probes beside a Table 1
weights directory.
"""

import argparse
import csv
import json
import pathlib
import re
import sys
import time

_NAME = re.compile(r"^(gdpp|diag|full)-L(\d+)-(u\d+|c[\d_]+)$")
COLUMNS = (
    "model",
    "family",
    "value",
    "method",
    "estimator",
    "mean",
    "se",
    "sequences",
    "median",
    "max",
    "top_share",
    "nonfinite",
)


def task_from_name(stem: str):
    """The training task of a Table 1 weights file from its name: u5 is σ ~ U(0, 5), c1_3 is
    σ uniform over {1, 3}. None if the name is not a Table 1 cell's."""
    import eqicl

    m = _NAME.match(stem)
    if m is None:
        return None
    tag = m.group(3)
    if tag.startswith("u"):
        return eqicl.TaskConfig(noise="uniform", sigma_max=float(tag[1:]))
    levels = tuple(float(v) for v in tag[1:].split("_") if v)
    return eqicl.TaskConfig(noise="categorical", sigma_set=levels)


def load_source(source: str):
    """(name, model, task, default output directory) of a run directory or weights file."""
    import eqicl

    path = pathlib.Path(source)
    if path.is_dir():
        model, config = eqicl.load_model(path)
        return path.name, model, config.task, path / "analysis" / "probes"
    if not path.is_file():
        raise eqicl.RunDirError(f"{path} is neither a run directory nor a weights file")
    model, _ = eqicl.load_weights(path)
    task = task_from_name(path.stem)
    if task is None:
        raise eqicl.WeightsError(
            f"{path.name}: cannot tell its training task from the name (expected "
            "<kind>-L<layers>-<u0..u7|c1_3|...>.npz, as runs/paper/weights holds)"
        )
    return path.stem, model, task, path.parent.parent / "probes"


def rows_of(name: str, result: dict) -> list[dict]:
    out = []
    for p in result["probes"]:
        for method, est in p["methods"].items():
            out.append(
                {
                    "model": name,
                    "family": p["family"],
                    "value": p["value"],
                    "method": method,
                    "estimator": p["estimator"],
                    **{k: est[k] for k in COLUMNS[5:]},
                }
            )
    return out


def write_table(out: pathlib.Path) -> pathlib.Path:
    """DIR/probes.csv from every DIR/*.json probe result (so runs of other models add up)."""
    rows = []
    for path in sorted(out.glob("*.json")):
        result = json.loads(path.read_text())
        if "probes" in result:
            rows += rows_of(path.stem, result)
    table = out / "probes.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.probes",
        description="Generalisation probes of trained models beside the baselines on the same "
        "sequences: context length, anisotropic covariates, noise scale and law.",
    )
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="run directory or .npz")
    parser.add_argument("--out", default=None, help="output directory (see above)")
    parser.add_argument("--sequences", type=int, default=20_000, help="per probe; default 20000")
    parser.add_argument("--families", default="n,kappa,sigma,law", help="probes to run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe sequences")
    args = parser.parse_args(argv)
    if args.sequences < 1000:
        parser.error(f"--sequences must be >= 1000, got {args.sequences}")
    families = [f for f in args.families.split(",") if f]

    from eqicl import setup_jax
    from eqicl._limits import machine_line

    setup_jax()
    import eqicl

    from ._probes import FAMILIES, default_probes, plot_probes, probe_model

    bad = [f for f in families if f not in FAMILIES]
    if bad:
        parser.error(f"--families takes {','.join(FAMILIES)}, got {','.join(bad)}")
    for source in args.sources:
        if source.endswith(".json"):  # a probe result: redraw its figure, rerun nothing
            result = json.loads(pathlib.Path(source).read_text())
            png = pathlib.Path(source).with_suffix(".png")
            plot_probes(pathlib.Path(source).stem, result, png)
            print(f"redrew {png}")
            continue
        try:
            name, model, task, default_out = load_source(source)
        except (eqicl.RunDirError, eqicl.ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        out = pathlib.Path(args.out) if args.out else default_out
        out.mkdir(parents=True, exist_ok=True)
        probes = [p for p in default_probes(task) if p.family in families]
        t0 = time.perf_counter()
        result = probe_model(model, task, probes, args.seed, args.sequences)
        result |= {
            "source": str(source),
            "task": {
                "noise": task.noise,
                "label": task.label,
                "n": task.n,
                "d": task.d,
                "sigma_range": task.sigma_range,
            },
            "seconds": round(time.perf_counter() - t0, 1),
            "machine": machine_line(),
        }
        (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        plot_probes(name, result, out / f"{name}.png")
        print(f"{name}: {result['seconds']:.0f} s, wrote {out / name}.json and .png")
        print(summary(name, result))
        write_table(out)
    return 0


def summary(name: str, result: dict) -> str:
    lines = []
    for p in result["probes"]:
        ms = p["methods"]
        ref = "tunedrr" if "tunedrr" in ms else "constrr"
        m, r = ms["model"], ms[ref]
        lines.append(
            f"  {p['family']:>5} = {p['value']!s:<8} model {m['mean']:.4g} ± {m['se']:.2g} "
            f"(median {m['median']:.3g}, max {m['max']:.3g}, top 0.1 % {m['top_share']:.2f}) "
            f"| {ref} {r['mean']:.4g} ± {r['se']:.2g}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
