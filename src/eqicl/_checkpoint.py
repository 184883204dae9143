"""Checkpoints of a run's training state: save, restore, verify, quarantine, prune.

Every checkpoint (orbax, `run_dir/checkpoints/<step>`) carries a metadata item with its step,
its arrays' shapes and dtypes, and a checksum of their bytes. A partially written one (orbax's
temporary directory) or a damaged one is skipped with a warning and moved to `corrupt/`;
one of another model shape is refused (RunDirError). A state with a non-finite value is never
saved. The structure is rebuilt from the config (`skeleton`), so static fields are never
stored."""

import contextlib
import dataclasses
import hashlib
import logging
import os
import pathlib
import shutil
import sys
from collections.abc import Callable

import equinox as eqx
import jax
import numpy as np

from . import _faults
from ._config import Config, TrainConfig
from ._files import RunDirError, os_reason, stderr_warning
from ._train import TrainState, init_ensemble

CORRUPT = "corrupt"
_TMP_MARK = ".orbax-checkpoint-tmp"


class _Corrupt(Exception):
    """A checkpoint that cannot be trusted (the reason is the message)."""


def _ocp():
    # orbax is slow to import and chatty (it warns about every read-only manager); only load
    # it where checkpoints are touched.
    logging.getLogger("absl").setLevel(logging.ERROR)
    import orbax.checkpoint as ocp

    if not isinstance(sys.unraisablehook, _QuietClosedLoop):
        sys.unraisablehook = _QuietClosedLoop(sys.unraisablehook)
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _QuietDamagedRead) for f in asyncio_log.filters):
        asyncio_log.addFilter(_QuietDamagedRead())
    return ocp


class _QuietClosedLoop:
    """An unraisable-exception hook that drops one kind: reading a damaged checkpoint makes
    tensorstore call back into orbax's finished asyncio loop, and each callback printed an
    'Event loop is closed' traceback (a dozen per damaged checkpoint) although the error itself
    is handled and reported in one line. Everything else goes to the previous hook."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            self.previous(unraisable)


class _QuietDamagedRead(logging.Filter):
    """Drops asyncio's 'Future exception was never retrieved' record when the exception is
    tensorstore's (its message carries a `tensorstore_spec`): reading a damaged checkpoint
    fails in several of orbax's futures at once, orbax retrieves the first, and whether the
    others' are logged when they are garbage-collected depends on when that happens; the
    failure itself is handled and reported in one line. Every other asyncio record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        e = record.exc_info[1] if record.exc_info else None
        return not (
            str(record.msg).startswith(("Future exception", "Task exception"))
            and e is not None
            and "tensorstore_spec" in str(e)
        )


def skeleton(config: Config) -> TrainState:
    """The shapes and dtypes of a run's training state, without computing it. A warm start
    (`model.init_from`) has exactly the structure of a GD start, so its file is not read:
    checking and resuming a run never depend on it."""
    cold = dataclasses.replace(config, model=dataclasses.replace(config.model, init_from=""))
    return eqx.filter_eval_shape(init_ensemble, cold)


def _is_shape(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def scheduled(step: int, train: TrainConfig) -> bool:
    """Checkpoints every uninterrupted run writes (the only rollback targets, so that a
    checkpoint saved on SIGTERM never changes where a later rollback goes)."""
    return step % train.checkpoint_every == 0 or step == train.steps


def checkpoint_manager(run_dir: pathlib.Path, read_only: bool = False):
    """Orbax manager of `run_dir/checkpoints`. Retention is `prune`'s job (orbax's
    max_to_keep would also count checkpoints saved on SIGTERM).

    With several processes, the writing manager is orbax's multi-process one: every process
    calls each save and delete, each writes its part and process 0 commits. A read-only
    manager belongs to the calling process alone (orbax's `active_processes`), so that
    process 0 can check checkpoints by itself, and each process reads the replicated state
    without waiting for the others."""
    ocp = _ocp()
    here = jax.process_index()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,
        create=not read_only,
        enable_async_checkpointing=False,
        read_only=read_only,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=here, active_processes={here}
        )
        if read_only
        else ocp.options.MultiprocessingOptions(),
    )
    return ocp.CheckpointManager(
        (run_dir / "checkpoints").absolute(), options=options, item_names=("state", "meta")
    )


def state_arrays(tree) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def _signature(arrays) -> list[str]:
    return [f"{np.dtype(a.dtype).name}{list(a.shape)}" for a in arrays]


def _digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def finite_state(state: TrainState) -> bool:
    """Model and optimizer state finite (`recent` uses NaN for "no loss yet")."""
    arrays = state_arrays((state.model, state.opt_state, state.lr_scale))
    return all(np.isfinite(a).all() for a in arrays if np.issubdtype(a.dtype, np.inexact))


def save_checkpoint(manager, state: TrainState) -> None:
    """Save `state` with a metadata item holding its step, array shapes and checksum.
    Refuses (ValueError) a state with a non-finite value: no checkpoint ever holds one."""
    ocp = _ocp()
    arrays = state_arrays(state)
    if not finite_state(state):
        raise ValueError("refusing to checkpoint a training state with non-finite values")
    step = int(state.step[0])
    meta = {
        "step": step,
        "layout": "named",
        "arrays": _signature(arrays),
        "sha256": _digest(arrays),
    }
    _faults.before_save(step, manager.directory)
    try:
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_named(eqx.filter(state, eqx.is_array))),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        manager.wait_until_finished()
    except Exception as e:  # a full disk, a read-only mount: orbax / tensorstore raise many kinds
        # The half-written directory is removed now, so that no later run mistakes it for one
        # whose writer was killed; the checkpoints before it are untouched.
        directory = pathlib.Path(manager.directory)
        for tmp in directory.glob(f"{step}{_TMP_MARK}*"):
            shutil.rmtree(tmp, ignore_errors=True)
        raise RunDirError(
            f"cannot write checkpoint {step} in {directory}: {os_reason(e)}"
        ) from None


def _key_name(key) -> str:
    for field in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
        if hasattr(key, field):
            return str(getattr(key, field))
    return str(key)


def _paths(tree) -> list[tuple[str, ...]]:
    """Every array's place in the state, in leaf order: ("model", "layers", "p"), ..."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [tuple(_key_name(k) for k in path) for path, _ in leaves]


def _named(tree) -> dict:
    """The state's arrays as a nested dict named by their place in it (model → layers → p,
    opt_state → 0 → mu → ...): what plain orbax shows of a checkpoint. The state itself is
    rebuilt from the config (`skeleton`; static fields are never saved)."""
    out: dict = {}
    for path, leaf in zip(_paths(tree), jax.tree.leaves(tree), strict=True):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def _unnamed(tree, named: dict) -> list:
    """The leaves of `named` (a restored `_named(tree)`) in `tree`'s leaf order."""
    out = []
    for path in _paths(tree):
        node = named
        for k in path:
            node = node[k]
        out.append(node)
    return out


def _as_dict(leaves: list) -> dict:
    # Checkpoints of earlier versions (no "layout" in their metadata): the leaves in order
    # under zero-padded keys.
    return {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}


def _read_meta(manager, step: int) -> dict:
    ocp = _ocp()
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types for a damaged directory
        raise _Corrupt(f"its metadata cannot be read: {type(e).__name__}") from None
    if not isinstance(meta, dict) or not {"step", "arrays", "sha256"} <= set(meta):
        raise _Corrupt("its metadata is incomplete")
    return meta


def _check_shapes(meta: dict, want: list[str], where: str) -> None:
    if meta["arrays"] != want:
        i = next(
            (i for i, (a, b) in enumerate(zip(meta["arrays"], want, strict=False)) if a != b),
            min(len(meta["arrays"]), len(want)),
        )
        got_i = meta["arrays"][i] if i < len(meta["arrays"]) else "nothing"
        want_i = want[i] if i < len(want) else "nothing"
        raise RunDirError(
            f"{where} holds a training state of another shape than config.json asks for "
            f"(array {i}: {got_i} saved, {want_i} expected); it belongs to a different model"
        )


def _restore_step(
    manager, step: int, config: Config, where: str, like: TrainState | None = None
) -> TrainState:
    ocp = _ocp()
    meta = _read_meta(manager, step)
    dynamic, static = eqx.partition(skeleton(config) if like is None else like, _is_shape)
    abstract = jax.tree.leaves(dynamic)
    _check_shapes(meta, _signature(abstract), where)
    # Every process restores the whole (replicated) state onto a device of its own, whatever
    # the devices and processes that saved it: a run resumes on any of them (the trainer
    # then replicates it over its mesh).
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here) for a in abstract]
    named = meta.get("layout") == "named"
    target = (
        _named(jax.tree.unflatten(jax.tree.structure(dynamic), abstract))
        if named
        else _as_dict(abstract)
    )
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )["state"]
        restored = _unnamed(dynamic, restored) if named else [restored[k] for k in sorted(restored)]
    except Exception as e:
        raise _Corrupt(f"its arrays cannot be read: {type(e).__name__}") from None
    arrays = [np.asarray(a) for a in restored]
    if _digest(arrays) != meta["sha256"] or meta["step"] != step:
        raise _Corrupt("its arrays do not match their checksum")
    state = eqx.combine(jax.tree.unflatten(jax.tree.structure(dynamic), restored), static)
    if not finite_state(state):
        raise _Corrupt("it holds non-finite values")
    if int(state.step[0]) != step:
        raise _Corrupt(f"it holds step {int(state.step[0])}")
    return state


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    """Committed checkpoint steps, newest first (orbax names them by their step)."""
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)


def check_checkpoint_shapes(
    run_dir: pathlib.Path, config: Config, like: TrainState | None = None
) -> None:
    """RunDirError if a readable checkpoint holds another model shape (read-only). `like`:
    the state's shapes when they are not the config's (`eqicl.Trainer.abstract`)."""
    steps = checkpoint_steps(run_dir)
    if not steps:
        return
    abstract = skeleton(config) if like is None else like
    want = _signature(jax.tree.leaves(eqx.filter(abstract, _is_shape)))
    manager = checkpoint_manager(run_dir, read_only=True)
    try:
        for step in steps:
            with contextlib.suppress(_Corrupt):
                _check_shapes(_read_meta(manager, step), want, f"checkpoint {step} of {run_dir}")
    finally:
        manager.close()


def _quarantine(run_dir: pathlib.Path, name: str) -> pathlib.Path:
    """Move checkpoints/<name> to corrupt/ (kept for inspection, out of orbax's way)."""
    dest_dir = run_dir / CORRUPT
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / name
    i = 1
    while dest.exists():
        dest, i = dest_dir / f"{name}.{i}", i + 1
    os.replace(run_dir / "checkpoints" / name, dest)
    return dest


def remove_partial_checkpoints(run_dir: pathlib.Path, warn: Callable[[str], None]) -> None:
    """Orbax writes a checkpoint into `<step>.orbax-checkpoint-tmp` and renames it when
    complete; such a directory is what a trainer killed while saving leaves behind."""
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return
    for p in sorted(directory.iterdir()):
        if _TMP_MARK in p.name:
            warn(
                f"{p} is a checkpoint whose writer was killed before finishing it; "
                f"moved to {CORRUPT}/"
            )
            _quarantine(run_dir, p.name)


def restore_checkpoint(
    run_dir: str | os.PathLike,
    config: Config,
    *,
    at_most: int | None = None,
    scheduled_only: bool = False,
    quarantine: bool = False,
    warn: Callable[[str], None] = stderr_warning,
    like: TrainState | None = None,
) -> TrainState | None:
    """The newest intact checkpoint (at step <= `at_most`, scheduled ones only if asked),
    restored into the config's state structure; None if there is none. A damaged one is
    skipped with a warning (and moved to corrupt/ if `quarantine`). A checkpoint of another
    model shape raises RunDirError. `like`: as in `check_checkpoint_shapes`."""
    run_dir = pathlib.Path(run_dir)
    steps = [
        s
        for s in checkpoint_steps(run_dir)
        if (at_most is None or s <= at_most) and (not scheduled_only or scheduled(s, config.train))
    ]
    if not steps:
        return None
    manager = checkpoint_manager(run_dir, read_only=True)
    try:
        for step in steps:
            where = f"checkpoint {step} of {run_dir}"
            try:
                return _restore_step(manager, step, config, where, like)
            except _Corrupt as e:
                action = f"moved to {CORRUPT}/" if quarantine else "skipped"
                warn(f"{where} is damaged ({e}); {action}")
                if quarantine:
                    _quarantine(run_dir, str(step))
    finally:
        manager.close()
    return None


def prune(manager, train: TrainConfig) -> None:
    """Keep the two newest scheduled checkpoints (the older one in case the newer is
    damaged) and any newer one saved on SIGTERM."""
    steps = sorted(manager.all_steps())
    regular = [s for s in steps if scheduled(s, train)]
    newest = regular[-1] if regular else -1
    keep = set(regular[-2:]) | {s for s in steps if s > newest}
    for s in steps:
        if s not in keep:
            manager.delete(s)


def restore_exact(
    run_dir: pathlib.Path, config: Config, step: int, why: str, like: TrainState | None = None
) -> TrainState:
    """Checkpoint `step` and no other: RunDirError (one line, naming `why` it is needed)
    when it is missing or damaged, never a fall-back to an older one. Writes nothing.
    `like`: as in `check_checkpoint_shapes`."""
    hint = (
        "rerun the same `python -m eqicl.train` command to rebuild it "
        "(training resumes from the newest intact checkpoint)"
    )
    if step not in checkpoint_steps(run_dir):
        raise RunDirError(f"{run_dir}: checkpoint {step}, {why}, is missing; {hint}")
    manager = checkpoint_manager(run_dir, read_only=True)
    try:
        return _restore_step(manager, step, config, f"checkpoint {step} of {run_dir}", like)
    except _Corrupt as e:
        raise RunDirError(
            f"{run_dir}: checkpoint {step}, {why}, is damaged ({e}); {hint}"
        ) from None
    finally:
        manager.close()
