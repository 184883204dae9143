"""Files no reader ever sees half of: one atomic writer for every results file eqicl writes
(config.json, eval.json, metrics.jsonl rewrites, table1.csv, the cell files, weights), the
one error they raise, and the append of one JSON line."""

import contextlib
import csv
import json
import os
import pathlib
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import IO


class RunDirError(ValueError):
    """A run or results directory that cannot be used as asked (a different config, another
    trainer, a file that cannot be written). The message is one line."""


_OS_REASONS = re.compile(
    r"No space left on device|Read-only file system|Permission denied|Disk quota exceeded"
)


def os_reason(e: BaseException) -> str:
    """The reason of a failed write in a few words: the OS error's text when there is one
    (orbax and tensorstore wrap it in pages of detail), else the exception's first line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if m := _OS_REASONS.search(str(e)):
        return m[0]
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:160]}"


def temporary_name(path: pathlib.Path) -> pathlib.Path:
    """Where `atomic_write` writes `path` before renaming it: a hidden name beside it, with
    the writer's pid (a killed writer leaves it behind; see eqicl._run.remove_leftovers)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, binary: bool = False) -> Iterator[IO]:
    """A file object to write `path` through: written under `temporary_name(path)`, synced
    and renamed onto `path` when the block ends; on any error (a full disk, a signal) the
    temporary file is removed and `path` is untouched. An OSError becomes a one-line
    RunDirError. The parent directory is created."""
    path = pathlib.Path(path)
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") if binary else open(tmp, "w", newline="") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise RunDirError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def write_json_atomic(path: str | os.PathLike, data, indent: int = 2) -> None:
    """`data` as JSON (sorted keys, NaN and infinities allowed), atomically."""
    with atomic_write(path) as f:
        json.dump(data, f, indent=indent, sort_keys=True, allow_nan=True)
        f.write("\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_csv_atomic(path: str | os.PathLike, fields: Sequence[str], rows: Iterable[dict]) -> None:
    """A CSV file with a header row, atomically."""
    with atomic_write(path) as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and sync it (a crash can tear only the last line; readers of
    metrics.jsonl stop at a torn one)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk: the torn line is cut on resume
        raise RunDirError(f"cannot write {path}: {e.strerror or e}") from None


def stderr_warning(message: str) -> None:
    """The default `warn` of eqicl's functions that can warn: one line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
