"""The run directory: config.json, metrics.jsonl, checkpoints/ (orbax), eval.json.

A run directory is the contract between training and everything that reads its results
(STYLE §7). Training resumes by default from the newest intact checkpoint, and a run that
is killed at any moment and restarted ends bitwise where an uninterrupted one would:

- every checkpoint carries a checksum of its arrays; a partially written (orbax temporary
  directory) or damaged one is skipped with a warning and moved to `corrupt/`;
- metrics.jsonl is cut back to the line the restored checkpoint was saved after;
- the divergence guard's state is checkpointed, and its rollbacks depend only on the
  trajectory, never on when the run was interrupted;
- SIGINT / SIGTERM save a checkpoint before exiting; `train.lock` (an flock, released by the
  kernel when its holder dies) keeps a second trainer out.
"""

import contextlib
import fcntl
import json
import math
import os
import pathlib
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import _faults
from ._checkpoint import (
    check_checkpoint_shapes,
    checkpoint_manager,
    prune,
    remove_partial_checkpoints,
    restore_checkpoint,
    restore_exact,
    save_checkpoint,
    scheduled,
)
from ._config import Config, ConfigError, TrainConfig
from ._evaluate import (
    SequenceCache,
    cast,
    ensemble_member,
    eval_dtype,
    evaluate as evaluate_model,
    select_estimates,
    selection_keys,
    selection_record,
)
from ._files import (
    RunDirError,
    append_jsonl,
    atomic_write,
    stderr_warning,
    write_json_atomic,
)
from ._limits import check_resources, machine_line
from ._model import LinearTransformer, layer_class
from ._paper import BASELINE_NAMES
from ._parallel import (
    first_signal,
    is_primary,
    local,
    num_devices,
    primary_decides,
    wait_for_primary,
)
from ._train import Trainer, TrainState
from ._version import __version__

# 2: checkpoints hold the state and a checksummed metadata item, and the divergence guard's
# fields; format-1 checkpoints cannot be restored into this state.
FORMAT = 2
LOCK = "train.lock"


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT / SIGTERM after saving a checkpoint."""

    def __init__(self, signum: int, step: int):
        super().__init__(signum, step)
        self.signum = signum
        self.step = step


class _Diverged(Exception):
    """Every seed has been given up by the divergence guard (args: reason, selection)."""


# What an interrupted write of a run directory's files leaves (eqicl._files.temporary_name;
# `metrics.jsonl.tmp` is the name that earlier versions used).
_LEFTOVER = re.compile(r"\.(config\.json|eval\.json|metrics\.jsonl)\.tmp\d+|metrics\.jsonl\.tmp")


def remove_leftovers(path: pathlib.Path, warn: Callable[[str], None]) -> None:
    """Delete what interrupted writes left in `path` (call it holding the lock)."""
    for p in sorted(path.iterdir()):
        if _LEFTOVER.fullmatch(p.name) and p.is_file():
            p.unlink()
            warn(f"removed {p}, left by an interrupted write")


def read_run_config(run_dir: str | os.PathLike) -> Config:
    """The config of an existing run directory (raises RunDirError if it is not one)."""
    path = pathlib.Path(run_dir)
    if not path.is_dir():
        what = "a file" if path.exists() else "no such directory"
        raise RunDirError(f"{run_dir} is not an eqicl run directory ({what})")
    path = path / "config.json"
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not an eqicl run directory (no config.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "config" not in data:
        found = data.get("format") if isinstance(data, dict) else "?"
        raise RunDirError(
            f"{path} was written by another eqicl version (format {found}, expected {FORMAT})"
        )
    if not isinstance(data["config"], dict):
        raise RunDirError(f"{path}: 'config' is not a JSON object")
    try:
        return Config.from_dict(data["config"])
    except ConfigError as e:
        raise RunDirError(f"{path}: {e}") from None


# Fields that say where a run computes, not what: a run resumes under other values of them
# (on another number of devices its numbers agree up to round-off, not bitwise).
NOT_IDENTITY = frozenset({"train.devices"})


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Every key where the config dicts `a` (a run directory's) and `b` (the one asked
    for) differ, as "key: a in the directory, b asked"; the fields in NOT_IDENTITY are no
    difference."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, f"{prefix}{k}.")
        elif va != vb and f"{prefix}{k}" not in NOT_IDENTITY:
            out.append(f"{prefix}{k}: {va!r} in the directory, {vb!r} asked")
    return out


def check_run_dir(
    run_dir: str | os.PathLike, config: Config, like: TrainState | None = None
) -> pathlib.Path:
    """Check, without writing anything, that `run_dir` can hold a run of `config`: it is
    new, empty, or a run of the same config whose checkpoints have the config's shapes (or
    those of `like`, a trainer's own state)."""
    path = pathlib.Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} exists and is not a directory")
    if (path / "config.json").exists():
        existing = read_run_config(path)
        diffs = config_differences(existing.to_dict(), config.to_dict())
        if diffs:
            raise RunDirError(
                f"{path} holds a run with a different config ({diffs[0]}"
                f"{f' and {len(diffs) - 1} more' if len(diffs) > 1 else ''}); "
                "choose another --run-dir or delete that directory"
            )
        check_checkpoint_shapes(path, config, like)
    elif path.exists() and any(
        p.name != LOCK and not _LEFTOVER.fullmatch(p.name) for p in path.iterdir()
    ):
        raise RunDirError(
            f"{path} is not empty and is not an eqicl run directory; refusing to write there"
        )
    return path


def prepare_run_dir(
    run_dir: str | os.PathLike, config: Config, like: TrainState | None = None
) -> pathlib.Path:
    """Create the run directory and write config.json before step 0, or check that an
    existing one holds the same config (then the run resumes)."""
    path = check_run_dir(run_dir, config, like)
    if not (path / "config.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            path / "config.json",
            {"format": FORMAT, "eqicl": __version__, "config": config.to_dict()},
        )
    return path


@contextlib.contextmanager
def run_lock(path: pathlib.Path, echo: Callable[[str], None] = print) -> Iterator[None]:
    """Hold `path/train.lock` (an exclusive flock) for the duration, or raise RunDirError.

    The kernel drops an flock when its holder dies, SIGKILL included, so a lock left by a
    dead trainer is simply taken over; the pid in the file names the holder for messages."""
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a read-only mount, a directory of another user
        raise RunDirError(f"cannot open {path / LOCK}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirError(
            f"{path} is in use by another trainer (pid {holder}); wait for it to finish or stop it"
        ) from None
    try:
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous and previous != str(os.getpid()):
            echo(
                f"taking over {path / LOCK} from trainer pid {previous}, which is no longer running"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def evaluated_step(eval_result: dict, config: Config) -> int:
    """The step of the model an eval.json describes (eval.json files written before
    "checkpoint" was recorded evaluated the final state, at train.steps)."""
    step = eval_result.get("checkpoint", config.train.steps)
    if not isinstance(step, int) or isinstance(step, bool):
        raise RunDirError(f"eval.json: 'checkpoint' is not a step number ({step!r})")
    return step


def load_model(run_dir: str | os.PathLike, member: int | None = None, step: int | None = None):
    """The trained model of a run. With an eval.json and no `member`: exactly the model it
    describes (its selected seed at its step; RunDirError if that checkpoint is damaged or
    missing). Otherwise seed `member` (default 0) from checkpoint `step` (default: the newest
    intact one). Returns (model, config). Writes nothing."""
    path = pathlib.Path(run_dir)
    config = read_run_config(path)
    why = "the one asked for"
    if member is None:
        member = 0
        ev = path / "eval.json"
        if ev.is_file():
            try:
                result = json.loads(ev.read_text())
                member = result["selection"]["best"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise RunDirError(f"{ev} is damaged (no selection.best); pass member=") from None
            if step is None:
                step, why = evaluated_step(result, config), "the model eval.json describes"
    if not (isinstance(member, int) and 0 <= member < config.train.seeds):
        raise RunDirError(f"member must be an integer in [0, {config.train.seeds}), got {member!r}")
    if step is not None:
        state = restore_exact(path, config, step, why)
    else:
        state = restore_checkpoint(path, config)
    if state is None:
        raise RunDirError(f"{path} has no intact checkpoint")
    return ensemble_member(state.model, member), config


# --------------------------------------------------------------------------------------------
# metrics.jsonl


def _read_lines(
    path: pathlib.Path, warn: Callable[[str], None] | None = None
) -> list[tuple[str, dict]]:
    """(line, record) pairs up to the first torn or foreign line (a crash mid-write, or bytes
    that are not UTF-8 JSON); `warn` hears how many lines from there on are left out."""
    out = []
    if not path.exists():
        return out
    lines = path.read_bytes().splitlines()
    for raw in lines:
        try:
            line = raw.decode()
            record = json.loads(line)
            int(record["step"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            break
        out.append((line, record))
    if warn is not None and len(out) < len(lines):
        warn(
            f"{path}: line {len(out) + 1} is torn or not a metrics record; it and the "
            f"{len(lines) - len(out) - 1} lines after it are dropped"
        )
    return out


def _write_lines(path: pathlib.Path, lines: list[str]) -> None:
    with atomic_write(path) as f:
        f.write("".join(line + "\n" for line in lines))


def _truncate_metrics_for_resume(
    path: pathlib.Path, step: int, warn: Callable[[str], None] | None = None
) -> None:
    """Cut metrics.jsonl back to where it was when checkpoint `step` was saved: right after
    the (last) call line of that step. Rollback events logged after the save are dropped:
    the restored state predates them and the resumed run logs them again."""
    records = _read_lines(path, warn)
    calls = [i for i, (_, r) in enumerate(records) if r["step"] == step and "event" not in r]
    end = calls[-1] + 1 if calls else sum(1 for _, r in records if r["step"] <= step)
    _write_lines(path, [line for line, _ in records[:end]])


def _truncate_metrics_for_rollback(path: pathlib.Path, step: int) -> None:
    """Drop the lines of the abandoned steps (every line's step is >= the one before)."""
    _write_lines(path, [line for line, r in _read_lines(path) if r["step"] <= step])


# The keys of eval.json that are timings: they differ between two runs of the same config.
TIMING_KEYS = ("train_seconds", "select_seconds", "eval_seconds")


def _train_seconds(metrics_path: pathlib.Path) -> float:
    return float(sum(r.get("seconds", 0.0) for _, r in _read_lines(metrics_path)))


# --------------------------------------------------------------------------------------------
# The divergence guard


def _set(state: TrainState, **fields: np.ndarray) -> TrainState:
    """Replace guard fields with host values, keeping each field's dtype (so the jitted
    chunk is not retraced)."""
    for name, value in fields.items():
        old = getattr(state, name)
        state = eqx.tree_at(lambda s, n=name: getattr(s, n), state, jnp.asarray(value, old.dtype))
    return state


def zero_train_loss(config: Config) -> float:
    """An upper bound on the training loss of predicting zero: ½d for the sampled objective,
    and ½E‖μ‖² <= ½E‖w‖² = ½d for the exact one, through the loss cap (concave, so the bound
    holds for the mean of capped losses by Jensen)."""
    loss, c = 0.5 * config.task.d, config.train.loss_clip
    if c > 0:
        loss = c * math.log1p(loss / c) if config.train.loss_cap == "soft" else min(loss, c)
    return loss


def _guard_reasons(
    state: TrainState, metrics: dict, train: TrainConfig, zero_loss: float = math.inf
) -> dict[int, str]:
    """Members (not given up) whose last call calls for a rollback, with the reason. Besides
    the running median, a call's loss is compared with `zero_loss` (`zero_train_loss`): a
    run bad from its first call has no history to compare with."""
    skipped = np.asarray(state.skipped)
    rollbacks = np.asarray(state.rollbacks)
    recent = np.asarray(state.recent, np.float64)
    reasons = {}
    for m, loss in enumerate(metrics["loss"]):
        if rollbacks[m] > train.max_rollbacks:
            continue
        if train.max_skipped and skipped[m] >= train.max_skipped:
            reasons[m] = f"{skipped[m]} non-finite steps skipped since the last checkpoint"
            continue
        history = recent[m][np.isfinite(recent[m])]
        if train.explode_factor and math.isfinite(loss) and history.size >= 4:
            median = float(np.median(history))
            if loss > max(train.explode_factor * median, train.explode_floor):
                reasons[m] = (
                    f"loss {loss:.4g} is {loss / median:.3g} x its running median {median:.4g}"
                )
                continue
        if (
            train.explode_factor
            and math.isfinite(loss)
            and loss > max(train.explode_factor * zero_loss, train.explode_floor)
        ):
            reasons[m] = (
                f"loss {loss:.4g} is {loss / zero_loss:.3g} x that of predicting zero "
                f"({zero_loss:.4g})"
            )
    return reasons


def _push_losses(state: TrainState, losses: list[float]) -> TrainState:
    recent = np.asarray(state.recent)
    recent = np.concatenate([recent[:, 1:], np.asarray(losses, recent.dtype)[:, None]], axis=1)
    return _set(state, recent=recent)


def _rollback(
    trainer: Trainer,
    path: pathlib.Path,
    manager,
    state: TrainState,
    reasons: dict[int, str],
    metrics_loss: list[float],
    say: Callable[[str], None],
    warn: Callable[[str], None],
) -> tuple[TrainState, bool]:
    """Roll the ensemble back to the newest intact scheduled checkpoint (or step 0) and
    lower the learning rate of the members in `reasons`; give up on members that exceeded
    `train.max_rollbacks` (raises _Diverged when none is left). `metrics_loss`, the
    abandoned call's mean losses, goes into the rollback event. Returns the state to go on
    from and whether it is a rolled-back one."""
    config = trainer.config
    tc = config.train
    step = int(state.step[0])
    lr_scale = np.asarray(state.lr_scale).copy()
    rollbacks = np.asarray(state.rollbacks).copy()
    back = []
    for m, reason in sorted(reasons.items()):
        if rollbacks[m] >= tc.max_rollbacks:
            rollbacks[m] = tc.max_rollbacks + 1
            say(f"step {step}: seed {m}: {reason}; given up after {tc.max_rollbacks} rollbacks")
        else:
            rollbacks[m] += 1
            lr_scale[m] *= tc.lr_backoff
            back.append(m)
    if np.all(rollbacks > tc.max_rollbacks):
        raise _Diverged(
            f"every seed diverged (non-finite or exploding loss after {tc.max_rollbacks} rollbacks)",
            {
                "losses": None,  # no seed is left to score on held-out sequences
                "best": None,
                "lr_scale": [float(v) for v in lr_scale],
                "rollbacks": [int(v) for v in rollbacks],
                "given_up": list(range(len(rollbacks))),
            },
        )
    if not back:
        return _set(state, rollbacks=rollbacks), False
    like = trainer.abstract() if trainer.custom else None
    found: list[TrainState | None] = []

    def choose() -> int | None:
        restored = restore_checkpoint(
            path,
            config,
            at_most=step,
            scheduled_only=True,
            quarantine=True,
            warn=warn,
            like=like,
        )
        found.append(restored)
        return None if restored is None else int(restored.step[0])

    # Process 0 picks the checkpoint (moving damaged ones aside); the others restore it.
    chosen = primary_decides(choose)
    restored = found[0] if found else None
    if chosen is not None and restored is None:
        restored = restore_exact(path, config, chosen, "the rollback target of process 0", like)
    restored = trainer.init() if restored is None else restored
    target = int(restored.step[0])
    # Checkpoints past the target (one saved on SIGTERM) belong to the abandoned trajectory.
    manager.reload()
    for s in manager.all_steps():
        if s > target:
            manager.delete(s)
    restored = _set(restored, lr_scale=lr_scale, rollbacks=rollbacks)
    if not is_primary():
        return restored, True
    metrics_path = path / "metrics.jsonl"
    _truncate_metrics_for_rollback(metrics_path, target)
    append_jsonl(
        metrics_path,
        {
            "event": "rollback",
            "step": target,
            "from_step": step,
            "members": back,
            "reasons": [reasons[m] for m in back],
            "loss": metrics_loss,
            "lr_scale": [float(v) for v in lr_scale],
            "rollbacks": [int(v) for v in rollbacks],
        },
    )
    for m in back:
        say(
            f"step {step}: seed {m}: {reasons[m]}; rolling back to step {target} with the "
            f"learning rate x {lr_scale[m]:.4g} "
            f"(rollback {rollbacks[m]} of at most {tc.max_rollbacks})"
        )
    return restored, True


# --------------------------------------------------------------------------------------------
# Training and evaluation


class Stopped(KeyboardInterrupt):
    """SIGINT / SIGTERM outside the training loop (while checking, restoring, evaluating):
    nothing to save, nothing half-written; a rerun takes up where this one was."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_outside_training() -> Iterator[list[int]]:
    """SIGINT and SIGTERM raise `Stopped` for the duration (SIGTERM's default would kill the
    process without a word, in the middle of an evaluation). A raise that lands in a
    callback Python ignores it in (jax's garbage-collection hooks) is raised again at the
    end, so the signal is never lost; the list yielded holds the signals received, for code
    that must not write after one (`finish` checks it before writing eval.json)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        received.append(signum)
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if received:
        raise Stopped(received[0])


@contextlib.contextmanager
def _stop_signals(say: Callable[[str], None]) -> Iterator[list[int]]:
    """SIGINT / SIGTERM set a flag the training loop checks after each jitted call (it then
    saves a checkpoint and stops); a second signal stops the process at once.

    Python runs signal handlers only between bytecodes, so a handler alone would wait for
    the jitted call in progress (tens of seconds with large batches). The C-level handler
    also writes each signal's number to a pipe (`signal.set_wakeup_fd`); a thread reading
    it ends the process on the second signal even while the main thread is inside XLA.
    Nothing is lost: checkpoints are atomic, a torn metrics line is cut on resume."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        say(
            f"{signal.Signals(signum).name} received: saving a checkpoint after the current "
            "call, then stopping (send it again to stop at once)"
        )

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def watch():
        count = 0
        while data := os.read(read_fd, 16):
            count += len(data)
            if count >= 2:
                os.write(2, b"stopped at once; rerun the same command to resume\n")
                os._exit(128 + data[-1])

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="eqicl-second-signal", daemon=True)
    watcher.start()
    try:
        yield received
    finally:
        signal.set_wakeup_fd(previous_fd)
        os.close(write_fd)  # the watcher reads end-of-file and returns
        watcher.join()
        os.close(read_fd)
        for s, h in previous.items():
            signal.signal(s, h)


def _train(
    config: Config,
    path: pathlib.Path,
    trainer: Trainer,
    state: TrainState,
    progress: bool,
    echo: Callable[[str], None],
    warn: Callable[[str], None],
) -> TrainState:
    """The host loop: one jitted call at a time (`Trainer.advance`), then its metrics line,
    the divergence guard (a rollback goes on from the restored state), the scheduled
    checkpoint, and SIGINT / SIGTERM (a checkpoint, then `Interrupted`)."""
    tc = config.train
    metrics_path = path / "metrics.jsonl"
    zero_loss = zero_train_loss(config)
    primary = is_primary()
    bar = None
    if progress and primary:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=tc.steps,
            initial=int(state.step[0]),
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )

    def say(message: str) -> None:
        (bar.write if bar is not None else echo)(message)

    manager = checkpoint_manager(path)
    try:
        with _stop_signals(say) as received:
            while int(state.step[0]) < tc.steps:
                state, metrics = trainer.advance(state)
                step = metrics["step"]
                if primary:
                    append_jsonl(metrics_path, metrics)
                _faults.after_call(step)
                # With several processes, a signal to any of them stops all after this call.
                signum = first_signal(received)
                reasons = _guard_reasons(state, metrics, tc, zero_loss)
                if reasons:
                    state, rolled_back = _rollback(
                        trainer, path, manager, state, reasons, metrics["loss"], say, warn
                    )
                    if rolled_back:
                        if signum:  # nothing to save: a resumed run re-derives the rollback
                            raise Interrupted(signum, int(state.step[0]))
                        if bar is not None:
                            bar.reset(total=tc.steps)
                            bar.update(int(state.step[0]))
                        continue
                state = _push_losses(state, metrics["loss"])
                if scheduled(step, tc):
                    state = _set(state, skipped=np.zeros_like(np.asarray(state.skipped)))
                if scheduled(step, tc) or signum:
                    # Every process saves (orbax writes each array once and commits on
                    # process 0), from the state replicated over the mesh.
                    save_checkpoint(manager, trainer.place(state))
                    prune(manager, tc)
                if signum:
                    raise Interrupted(signum, step)
                if bar is not None:
                    bar.update(step - bar.n)
                    bar.set_postfix(loss=f"{min(metrics['loss']):.4g}", refresh=False)
            return state
    finally:
        manager.close()
        if bar is not None:
            bar.close()


def _failed(reason: str, **extra) -> dict:
    return {"status": "failed", "reason": reason, **extra}


def trivial_losses(task) -> dict[str, float]:
    """Expected unadjusted loss ½E(ŷ − y_t)² of two predictors every trained model must beat,
    in closed form (SPEC §1: w, x ~ N(0, I_d), noiseless query): predicting zero, ½d, and one
    gradient-descent step from 0 with its best step size, ŵ = η Xᵀy with
    η = 1/(n + d + 1 + E σ²), ½(d − n d / (n + d + 1 + E σ²)) (E tr (XᵀX)² = n d (n + d + 1))."""
    d, n, s2 = task.d, task.n, task.mean_sigma2
    return {"zero": 0.5 * d, "gd1": 0.5 * (d - n * d / (n + d + 1 + s2))}


def _non_finite(tree, where: str = "") -> list[str]:
    """Paths of the non-finite numbers in a JSON-like tree."""
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _non_finite(v, f"{where}{k}.")]
    if isinstance(tree, (list, tuple)):
        return [p for i, v in enumerate(tree) for p in _non_finite(v, f"{where[:-1]}[{i}].")]
    if isinstance(tree, float) and not math.isfinite(tree):
        return [f"{where[:-1]} = {tree}"]
    return []


def sanity(config: Config, result: dict) -> str | None:
    """Why an evaluated model is not a sane result (None if it is): a non-finite number in
    eval.json, or an adjusted loss above predicting zero or one best-step GD step by more
    than three standard errors (and always at twice the reference). Exempt: the selection (a
    given-up seed's loss may be NaN), and a tail-aware estimate that overflows float64
    (`model.tail.finite` false): that is what the model's expectation is found to be, not a
    broken run, and the table says so."""
    bad = _non_finite({k: v for k, v in result.items() if k != "selection"})
    if not result.get("model", {}).get("tail", {}).get("finite", True):
        bad = [b for b in bad if not b.startswith("model.tail.")]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        return f"eval.json holds non-finite numbers ({bad[0]}{more})"
    oracle = result["oracle_expected_unadjusted"]
    model = result["model"]["adjusted_exact"]
    names = {"zero": "predicting zero", "gd1": "one gradient-descent step"}
    for name, unadjusted in trivial_losses(config.task).items():
        reference = unadjusted - oracle["mean"]
        # Three standard errors, but never more than the reference itself: a diverged
        # model's losses are so heavy-tailed that its own standard error would excuse it.
        margin = min(3 * math.hypot(model["se"], oracle["se"]), abs(reference))
        if model["mean"] > reference + margin:
            return (
                f"the model's adjusted loss {model['mean']:.4g} is worse than "
                f"{names[name]} ({reference:.4g})"
            )
    return None


def _write_eval(path: pathlib.Path, result: dict, stopped: list[int] | None) -> None:
    """eval.json, unless a signal came (`stop_outside_training`): then `Stopped`, so that a
    stop whose raise was swallowed mid-evaluation still writes nothing."""
    if stopped:
        raise Stopped(stopped[0])
    write_json_atomic(path, result)


def finish(
    config: Config,
    path: pathlib.Path,
    state: TrainState,
    echo: Callable[[str], None] = print,
    baselines: bool = True,
    test_cache: SequenceCache | None = None,
    stopped: list[int] | None = None,
) -> dict:
    """Select the best seed on held-out sequences, evaluate it (with the baselines unless
    `baselines=False`; on `test_cache` if given, see `run`), write eval.json with the step of the model (the checkpoint analysis
    reads). A model with non-finite predictions is reported as failed, never scored; one
    whose numbers are not sane (`sanity`) as suspect, with its numbers and the reason."""
    tc = config.train
    eval_path = path / "eval.json"
    # The selection samples in the evaluation dtype; the model must match it (strict promotion).
    t_select = time.perf_counter()
    estimates = select_estimates(cast(state.model, eval_dtype()), config)
    select_seconds = time.perf_counter() - t_select
    keys = selection_keys(estimates)
    losses = np.asarray([loss for _, loss in keys], np.float64)
    gave_up = np.asarray(state.rollbacks) > tc.max_rollbacks
    usable = np.isfinite(losses) & ~gave_up
    selection = {
        **selection_record(estimates),
        # A usable seed first, then by rank (eqicl._evaluate.verdict), then the lower loss.
        "best": min(range(len(keys)), key=lambda k: (not usable[k], keys[k])),
        "lr_scale": [float(v) for v in np.asarray(state.lr_scale)],
        "rollbacks": [int(v) for v in np.asarray(state.rollbacks)],
        "given_up": [int(m) for m in np.flatnonzero(gave_up)],
    }
    extra = {
        "selection": selection,
        "train_seconds": _train_seconds(path / "metrics.jsonl"),
        "select_seconds": select_seconds,  # the seeds' validation, before eval_seconds
        # The machine the times here were taken on (a resumed run: where it finished).
        "machine": machine_line(tc.dtype),
        "steps": tc.steps,
        "checkpoint": int(state.step[0]),
    }
    if not usable.any():
        reason = "every seed's model gives non-finite predictions or was given up"
        result = _failed(reason, **extra)
        _write_eval(eval_path, result, stopped)
        return result
    best = selection["best"]
    echo(f"evaluating seed {best} of {len(losses)} on {config.eval.sequences:,} sequences")
    t0 = time.perf_counter()
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite numbers: see sanity()
        result = evaluate_model(
            ensemble_member(state.model, best), config, baselines=baselines, test_cache=test_cache
        )
    if not result["model"]["finite"]:
        result = _failed(
            f"seed {best}'s model gives non-finite predictions on the test sequences", **extra
        )
    else:
        result.update(status="ok", eval_seconds=time.perf_counter() - t0, **extra)
        reason = sanity(config, result)
        if reason is not None:
            result.update(status="suspect", reason=reason)
    _write_eval(eval_path, result, stopped)
    return result


def run(
    config: Config,
    run_dir: str | os.PathLike,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] = stderr_warning,
    evaluate: bool = True,
    baselines: bool = True,
    test_cache: SequenceCache | None = None,
    trainer: Trainer | None = None,
) -> dict:
    """Train (or resume) into `run_dir`, select the best seed, evaluate, write eval.json
    (with the baselines on the same sequences unless `baselines=False`; with
    `evaluate=False`, stop after training: {"status": "trained", "steps": ...}).
    `test_cache` holds the test sequences of earlier evaluations to score on again
    (`eqicl.SequenceCache`; the sweep shares one across the cells of a noise setting).
    `trainer`: an `eqicl.Trainer` of this config with parts of one's own (model, optimizer,
    objective, sampler); the run directory records the config, not those functions, so a
    resumed run must be given the same trainer. Evaluation needs a LinearTransformer.

    Bad input (a different config in `run_dir`, a non-run directory, checkpoints of another
    model shape, a run directory in use) raises RunDirError before anything is written.
    SIGINT / SIGTERM save a checkpoint and raise `Interrupted`.

    With several processes (`jax.distributed`, eqicl._parallel) every process calls it with
    the same arguments: process 0 alone writes and locks the run directory and evaluates,
    all take part in training and checkpoints, and all return its result."""
    # Everything that can refuse the config does so before anything is written.
    config.to_dict()  # config.json must be able to hold it (not a task with its own NoiseLaw)
    check_resources(config)
    num_devices(config.train)
    if trainer is None:
        trainer = Trainer(config)
    elif trainer.config != config:
        raise ValueError("the trainer was built for another config than the one given to run")
    like = trainer.abstract() if trainer.custom else None
    if config.model.init_from:
        eqx.filter_eval_shape(trainer.init)
    if evaluate and like is not None and not isinstance(like.model, LinearTransformer):
        raise ValueError(
            f"evaluation scores a LinearTransformer, not a {type(like.model).__name__}; "
            "run(..., evaluate=False) trains it"
        )
    primary = is_primary()
    path = pathlib.Path(run_dir)
    with stop_outside_training() as stopped, contextlib.ExitStack() as held:
        found: list[TrainState | None] = []

        def prepare() -> int | None:
            """Process 0's part: check and lock the directory, clean it, pick the checkpoint
            to resume from; returns its step (None: start at step 0)."""
            check_run_dir(path, config, like)
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RunDirError(f"cannot create {path}: {e.strerror}") from None
            held.enter_context(run_lock(path, echo))
            remove_leftovers(path, warn)
            prepare_run_dir(
                path, config, like
            )  # again under the lock: another trainer may have won
            remove_partial_checkpoints(path, warn)
            state = restore_checkpoint(path, config, quarantine=True, warn=warn, like=like)
            found.append(state)
            metrics_path = path / "metrics.jsonl"
            if state is None:
                metrics_path.unlink(missing_ok=True)
                return None
            start = int(state.step[0])
            _truncate_metrics_for_resume(metrics_path, start, warn)
            echo(f"resuming {path} from step {start}")
            _say_where_it_ran(path, config, trainer, start, echo)
            return start

        # Process 0 decides; every other process then restores the very same checkpoint.
        resume = primary_decides(prepare)
        state = found[0] if found else None
        if resume is not None and state is None:
            state = restore_exact(path, config, resume, "the one process 0 resumes from", like)
        if state is None:
            state = trainer.init()
        start = 0 if resume is None else resume
        eval_path = path / "eval.json"
        if start >= config.train.steps and eval_path.is_file():
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                result = json.loads(eval_path.read_text())
                if primary:
                    echo(f"{path} is finished; results in {eval_path}")
                return result
        if start < config.train.steps:
            from ._kernel import describe

            what = describe(config.train)
            if trainer.custom:
                what = "a trainer's own parts (eqicl.Trainer) over the config's steps and seeds"
            echo(f"training step: {what}")
            try:
                state = _train(config, path, trainer, state, progress, echo, warn)
            except _Diverged as e:
                reason, selection = e.args
                result = _failed(reason, selection=selection, steps=config.train.steps)
                if primary:
                    write_json_atomic(eval_path, result)
                return result
        if not evaluate:
            return {"status": "trained", "steps": int(state.step[0])}
        # Process 0 selects, evaluates and writes eval.json; the others wait for it.
        state = local(state)
        if not primary:
            wait_for_primary("evaluated")
            return _read_eval(eval_path)
        try:
            return finish(config, path, state, echo, baselines, test_cache, stopped)
        finally:
            wait_for_primary("evaluated")


def _read_eval(eval_path: pathlib.Path) -> dict:
    """eval.json as process 0 wrote it (RunDirError if it did not)."""
    try:
        return json.loads(eval_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise RunDirError(f"process 0 wrote no readable {eval_path}; its output says why") from None


def _say_where_it_ran(
    path: pathlib.Path, config: Config, trainer: Trainer, start: int, echo: Callable[[str], None]
) -> None:
    """One line when a run resumes on other hardware than its last call ran on: it agrees
    with the unbroken run up to round-off, not bitwise (the order of the batch sum)."""
    began = read_run_config(path).train.devices
    if began != config.train.devices:
        echo(
            f"(train.devices={config.train.devices} now, {began} when the run began: "
            "the numbers agree with an unbroken run up to round-off, not bitwise)"
        )
        return
    calls = [r for _, r in _read_lines(path / "metrics.jsonl") if "event" not in r]
    if not calls or "devices" not in calls[-1]:
        return
    before = (calls[-1]["devices"], calls[-1].get("processes", 1))
    now = (1 if trainer.mesh is None else trainer.mesh.size, jax.process_count())
    if before != now:

        def where(devices: int, processes: int) -> str:
            return (
                f"{devices} device{'s' * (devices != 1)} "
                f"in {processes} process{'es' * (processes != 1)}"
            )

        echo(
            f"({where(*now)} now, {where(*before)} up to step {start}: "
            "the numbers agree with an unbroken run up to round-off, not bitwise)"
        )


def summary_table(config: Config, result: dict) -> str:
    """A short table: this model, the baselines, the paper's values."""
    if result.get("status") == "failed":
        return f"FAILED: {result.get('reason', 'non-finite predictions')}"
    if result.get("status") == "suspect":
        return f"SUSPECT: {result['reason']}\n{summary_table(config, {**result, 'status': 'ok'})}"
    paper = result.get("paper", {})
    m = config.model
    name = f"{layer_class(m.kind).label} L={m.layers}"
    lines = [
        f"adjusted loss, task {config.task.noise} σ {config.task.label}, "
        f"d={config.task.d} n={config.task.n}, "
        f"{result['sequences']:,} test sequences",
        f"{'method':<14}{'exact':>18}{'sampled':>18}{'paper':>9}",
    ]

    def row(label, r, ref):
        ex, sa = r["adjusted_exact"], r["adjusted_sampled"]
        ref_s = f"{ref:.3g}" if ref is not None else "-"
        return (
            f"{label:<14}{ex['mean']:>10.4g} ± {ex['se']:<5.1g}"
            f"{sa['mean']:>10.4g} ± {sa['se']:<5.1g}{ref_s:>9}"
        )

    lines.append(row(name, result["model"], paper.get("model")))
    for b in ("constrr", "adarr", "tunedrr", "ols", f"gd{m.layers}"):
        if b in result["baselines"]:
            label = BASELINE_NAMES.get(b, f"GD {m.layers} steps")
            lines.append(row(label, result["baselines"][b], paper.get(b)))
    plain, tail = result["model"].get("exact_tail"), result["model"].get("tail")
    if plain and tail:  # is the number carried by a few sequences? (SPEC §9)
        lines.append(
            f"{name} tail: the top 0.1 % of the test sequences carry {plain['top_share']:.1%} "
            f"of the exact mean (largest loss {plain['max']:.3g}); tail-aware estimate on "
            f"{tail['sequences']:,} sequences {tail['mean']:.4g} ± {tail['se']:.1g} (top 0.1 % "
            f"{tail['top_share']:.1%}, largest loss {tail['max']:.3g})"
        )
    lines.append(
        f"train {result.get('train_seconds', 0):.1f} s, eval {result.get('eval_seconds', 0):.1f} s"
    )
    return "\n".join(lines)
