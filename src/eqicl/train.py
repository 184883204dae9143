"""Command line: `python -m eqicl.train --preset NAME --run-dir DIR [--set section.field=value]`
(or `--config FILE`: a run's config.json or a `--print-config` output, e.g. to rerun a run).

Trains (resuming from the newest checkpoint if the run directory already holds this config),
selects the best seed on held-out sequences, evaluates it on fresh sequences with the
baselines, writes eval.json and prints a short table.
"""

import argparse
import os
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


def _fields_help() -> str:
    """The config fields with the default preset's values, for --help."""
    from ._config import preset

    lines = ["config fields (--set SECTION.FIELD=VALUE; values of the default preset):"]
    data = preset("default").to_dict()
    for section, fields in data.items():
        if not isinstance(fields, dict):
            lines.append(f"  {section}={fields}")
            continue
        for name, value in fields.items():
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            lines.append(f"  {section}.{name}={value}")
    return "\n".join(lines)


def _load_config(path: str, overrides: list[str]):
    """The config in `path` (a run's config.json, or a bare config as --print-config prints
    it) with `overrides` on top; ConfigError (one line) if it cannot be read."""
    import json
    import pathlib

    from ._config import Config, ConfigError, override

    try:
        data = json.loads(pathlib.Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path} is not valid JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "format" in data:
        data = data["config"]  # a run directory's config.json
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} does not hold a config (a JSON object)")
    config = Config.from_dict(data)
    return override(config, overrides) if overrides else config


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
        epilog=_fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset", default="default", help="tiny | default | paper (default: default)"
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="start from this config (a run's config.json or a --print-config output) "
        "instead of a preset; --set applies on top",
    )
    parser.add_argument(
        "--run-dir", default=None, help="output directory (resumed if it exists; required to train)"
    )
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
        if args.config is not None:
            config = _load_config(args.config, args.overrides)
        else:
            config = preset(args.preset, args.overrides)
        faults()  # a malformed EQICL_FAULT is bad input too
        if args.print_config:
            print(config.to_json())
            return 0
        if args.run_dir is None:
            raise ConfigError("--run-dir is required to train (only --print-config works without)")
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
    except Exception as e:
        import jax

        if jax.process_count() == 1 or not isinstance(e, jax.errors.JaxRuntimeError):
            raise
        # A collective failed: another process of the run is gone. Exit now: JAX's shutdown
        # at exit would wait minutes for the dead process at its barrier.
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        print(
            f"error: process {jax.process_index()} lost the other processes ({first}); "
            "stop every process of the run and rerun the same command on all of them to "
            "resume from the last checkpoint",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(3)
    print(summary_table(config, result))
    return 0 if result.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
