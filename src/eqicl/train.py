"""Command line: `python -m eqicl.train --preset NAME --run-dir DIR [--set section.field=value]`.

Trains (resuming from the newest checkpoint if the run directory already holds this config),
selects the best seed on held-out sequences, evaluates it on fresh sequences with the
baselines, writes eval.json and prints a short table.
"""

import argparse
import signal
import sys


def _repeated(overrides: list[str]) -> str | None:
    """A warning for the first key given twice by --set (the later value wins)."""
    seen: dict[str, str] = {}
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if key in seen:
            return (
                f"warning: --set {key} is given twice ({seen[key]}, then {o}); the last one is used"
            )
        seen[key] = o
    return None


def main(argv: list[str] | None = None) -> int:
    # Importing jax takes seconds; a signal then must not be lost (nor swallowed by an
    # import): it is noted, and acted on once the imports are done.
    early: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, frame: early.append(signum))
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    parser = argparse.ArgumentParser(
        prog="python -m eqicl.train",
        description="Train a linear transformer on in-context noisy linear regression, "
        "then evaluate it against the ridge baselines and the paper's Table 1.",
    )
    parser.add_argument(
        "--preset", default="default", help="tiny | default | paper (default: default)"
    )
    parser.add_argument("--run-dir", required=True, help="output directory (resumed if it exists)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field, e.g. --set model.layers=5 (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    try:
        args = parser.parse_args(argv)

        from ._cli import setup_jax

        setup_jax()
        from ._config import ConfigError, preset
        from ._faults import faults
        from ._parallel import initialize_distributed

        initialize_distributed()  # multi-host: only when a multi-process launch is detected
        from ._run import Interrupted, RunDirError, Stopped, run, summary_table
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if early:
        name = signal.Signals(early[0]).name
        print(f"{name} received while starting; nothing was written", file=sys.stderr)
        return 128 + early[0]

    try:
        if message := _repeated(args.overrides):
            print(message, file=sys.stderr)
        config = preset(args.preset, args.overrides)
        faults()  # a malformed EQICL_FAULT is bad input too
        if args.print_config:
            print(config.to_json())
            return 0
        result = run(config, args.run_dir, progress=not args.no_progress)
    except (ConfigError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only mount, a permission: one line, no traceback
        where = f"cannot write {e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(
            f"stopped at step {e.step} after saving a checkpoint; rerun the same command to resume",
            file=sys.stderr,
        )
        return 128 + e.signum
    except Stopped as e:
        print(
            f"{signal.Signals(e.signum).name} received; stopped with nothing half-written: "
            "rerun the same command to go on",
            file=sys.stderr,
        )
        return 128 + e.signum
    except KeyboardInterrupt:
        print(
            "interrupted; rerun the same command to resume from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    print(summary_table(config, result))
    return 0 if result.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
