"""Fault injection for the reliability tests, switched on by the `EQICL_FAULT` environment
variable (unset: every hook is a no-op and adds nothing to the jitted step).

`EQICL_FAULT` is a comma-separated list of faults:

- `kill@S`, `int@S`, `term@S`: send SIGKILL / SIGINT / SIGTERM to the trainer itself right
  after the jitted call that reaches step S has been logged, before any checkpoint of S;
- `kill-in-save@S`: SIGKILL inside the write of checkpoint S, after orbax has written every
  file into its temporary directory and before it commits it (the worst moment to die);
- `fill-before-save@S`: fill the file system of the run directory (a file `.eqicl-fill`
  beside the run directory) right before checkpoint S is written, so that this write and
  no earlier one meets a full disk;
- `nan@A-B[/M]`: the gradient of steps A..B (of member M, default every member) is NaN, on the
  first pass only (a transient fault: the steps replayed after a rollback are clean);
  `nan-always@A-B[/M]`: on every pass (a persistent fault);
- `big@A-B[/M]`: the loss and gradient of steps A..B are multiplied by 1e6 on the first pass
  (a finite loss explosion).

Faults are tied to steps, not to times, so a test hits the same moment on every run.
"""

import contextlib
import dataclasses
import os
import re
import signal
from typing import TypeVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._config import ConfigError

_Tree = TypeVar("_Tree")  # a pytree (the gradient) that comes back with its structure

ENV = "EQICL_FAULT"
_SIGNAL_FAULT = re.compile(r"(kill|int|term|kill-in-save|fill-before-save)@(\d+)")
_STEP_FAULT = re.compile(r"(nan|nan-always|big)@(\d+)(?:-(\d+))?(?:/(\d+))?")
_SIGNALS = {"kill": signal.SIGKILL, "int": signal.SIGINT, "term": signal.SIGTERM}


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    start: int
    stop: int
    member: int | None = None


def faults() -> tuple[Fault, ...]:
    """The faults `EQICL_FAULT` asks for (raises ConfigError on a malformed value)."""
    out = []
    for item in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        if m := _SIGNAL_FAULT.fullmatch(item):
            out.append(Fault(m[1], int(m[2]), int(m[2])))
        elif m := _STEP_FAULT.fullmatch(item):
            start = int(m[2])
            stop = int(m[3]) if m[3] else start
            out.append(Fault(m[1], start, stop, int(m[4]) if m[4] else None))
        else:
            raise ConfigError(f"{ENV}: cannot parse fault {item!r}")
    return tuple(out)


def after_call(step: int) -> None:
    """Signal faults due once the call reaching `step` is logged."""
    for f in faults():
        if f.kind in _SIGNALS and f.start == step:
            os.kill(os.getpid(), _SIGNALS[f.kind])


def before_save(step: int, directory: str | os.PathLike) -> None:
    """Arm `kill-in-save@step` (SIGKILL when orbax is about to commit checkpoint `step`) and
    apply `fill-before-save@step` (`directory`: the checkpoints directory)."""
    if any(f.kind == "fill-before-save" and f.start == step for f in faults()):
        _fill(os.path.dirname(os.path.dirname(os.path.abspath(directory))))
    if not any(f.kind == "kill-in-save" and f.start == step for f in faults()):
        return
    # A private orbax class: only ever touched under this test-only variable. If orbax
    # renames it the AttributeError makes the test fail loudly, never pass silently.
    from orbax.checkpoint._src.path import atomicity

    cls = atomicity.AtomicRenameTemporaryPath
    original = cls.finalize

    async def finalize(self):
        if self.get_final().name == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self)

    cls.finalize = finalize


def _fill(where: str) -> None:
    """Write zeros into `where`/.eqicl-fill until the file system is full."""
    block = bytes(4096)
    with open(os.path.join(where, ".eqicl-fill"), "ab", buffering=0) as f:
        with contextlib.suppress(OSError):
            while f.write(block):
                pass
        with contextlib.suppress(OSError):  # the last partial block
            while f.write(b"\0"):
                pass


def corrupt_gradient(
    loss: Float[Array, ""],
    grads: _Tree,
    step: Int[Array, ""],
    member: Int[Array, ""],
    rollbacks: Int[Array, ""],
) -> tuple[Float[Array, ""], _Tree]:
    """Apply the `nan` / `big` faults to one step's loss and gradient (a no-op without them).
    Read at trace time, so an unset variable leaves the compiled step unchanged."""
    for f in faults():
        if f.kind not in ("nan", "nan-always", "big"):
            continue
        hit: Bool[Array, ""] = (step >= f.start) & (step <= f.stop)
        if f.member is not None:
            hit = hit & (member == f.member)
        if f.kind != "nan-always":
            hit = hit & (rollbacks == 0)
        if f.kind == "big":
            factor = jnp.where(hit, 1e6, 1.0).astype(loss.dtype)
            loss = loss * factor
            grads = jax.tree.map(lambda g, f=factor: g * f.astype(g.dtype), grads)
        else:
            loss = jnp.where(hit, jnp.nan, loss).astype(loss.dtype)
            grads = jax.tree.map(lambda g, h=hit: jnp.where(h, jnp.nan, g).astype(g.dtype), grads)
    return loss, grads
