"""Data parallelism from outside the step (STYLE §11): a one-axis `jax.sharding.Mesh` named
"data"; the training step is written for one device, its sampled batch is sharded over "data"
(`sample_train_data`), the training state is replicated, and XLA's SPMD partitioner inserts
the gradient all-reduce. Seed ensembles vmap over members around the same step, so each
member's batch is sharded the same way.

Several processes (JAX's multi-controller runtime, `initialize_distributed`) run the same
program; the mesh then spans every process's devices, and each step's batch is still drawn
whole from the step's key inside the jitted step, so it does not depend on how many
processes or devices share it. Process 0 alone writes the run directory (`is_primary`) and
decides what the others cannot decide alone (`primary_decides`: which checkpoint to resume
from, whether the directory may be used at all); every process takes part in the
collectives and in orbax's saves and restores.
"""

import json
import os
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ._config import ConfigError, TrainConfig
from ._files import RunDirError

_T = TypeVar("_T")

# Bytes of the message process 0 broadcasts (`primary_decides`): a JSON value, or an error
# message, which is cut to fit.
_MESSAGE_BYTES = 4096


def initialize_distributed() -> bool:
    """`jax.distributed.initialize` when a multi-process launch is detected: explicitly via
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or a SLURM / Open MPI job
    with more than one task (JAX reads those itself). Returns whether it initialised.

    CPU collectives across processes go through gloo (JAX's TCP implementation) unless
    JAX_CPU_COLLECTIVES_IMPLEMENTATION chooses another; without one, a CPU mesh spanning
    several processes cannot all-reduce."""
    env = os.environ
    explicit = bool(env.get("JAX_COORDINATOR_ADDRESS"))
    launched = (
        int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if not (explicit or launched):
        return False
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in env:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None,
            process_id=int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None,
        )
    else:
        jax.distributed.initialize()
    return True


def is_primary() -> bool:
    """Whether this process writes the run directory: process 0 (the only one, unless
    several were launched)."""
    return jax.process_index() == 0


def num_devices(train: TrainConfig) -> int:
    """How many devices share each step's batch: `train.devices`, or with 0 the largest
    number of available devices that divides the batch. With several processes every
    process gives the same number of its devices, so the count is a multiple of theirs."""
    available, processes = jax.device_count(), jax.process_count()
    if train.devices > available:
        raise ConfigError(
            f"train.devices={train.devices} but only {available} devices are available"
        )
    if train.devices:
        if train.devices % processes:
            raise ConfigError(
                f"train.devices={train.devices} is not a multiple of the {processes} processes "
                "(each process gives the same number of its devices)"
            )
        return train.devices
    counts = [k for k in range(processes, available + 1, processes) if train.batch % k == 0]
    if not counts:
        raise ConfigError(
            f"train.batch={train.batch} is not a multiple of any device count that "
            f"{processes} processes can share equally; choose a batch divisible by {processes}"
        )
    return max(counts)


def data_mesh(train: TrainConfig) -> Mesh | None:
    """The "data" mesh for `train`, or None on one device (then nothing is sharded). With
    several processes it holds the same number of devices of each (never None)."""
    k = num_devices(train)
    if k == 1:
        return None
    processes = jax.process_count()
    per_process = k // processes
    devices = [
        d
        for p in range(processes)
        for d in sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)[
            :per_process
        ]
    ]
    return jax.make_mesh((k,), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def replicate(tree, mesh: Mesh):
    """Every array of `tree` replicated over `mesh`, wherever it is now (a state restored from
    a checkpoint lives on one local device; arrays already so placed are kept). Across
    processes each process builds its own shards from its own copy, which is the same on
    every process (the state is a function of the run's config and step alone)."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def place(x):
        if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
            return x
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)


def local(tree):
    """`tree` with every array that spans other processes' devices (replicated ones: the
    training state) replaced by this process's copy on its own default device; unchanged in
    a single process."""
    if jax.process_count() == 1:
        return tree

    def copy(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if not x.is_fully_replicated:
            raise ValueError(f"an array of shape {x.shape} is sharded across processes")
        return jax.device_put(np.asarray(x.addressable_data(0)), jax.local_devices()[0])

    return jax.tree.map(copy, tree)


def primary_decides(decide: Callable[[], _T]) -> _T:
    """`decide()` run by process 0 alone, its result (JSON: None, numbers, strings, lists,
    dicts) returned on every process. If it raises, process 0 raises that, and the others a
    one-line RunDirError with its message, so that no process is left waiting. In a single
    process: just `decide()`."""
    if jax.process_count() == 1:
        return decide()
    from jax.experimental import multihost_utils

    message = np.zeros(_MESSAGE_BYTES, np.uint8)
    failure: BaseException | None = None
    if is_primary():
        try:
            text = json.dumps({"value": decide()})
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the broadcast
            failure = e
            text = json.dumps({"error": (str(e) or type(e).__name__)[: _MESSAGE_BYTES // 2]})
        data = text.encode()
        if len(data) > _MESSAGE_BYTES:
            failure = ValueError(f"process 0's decision is {len(data)} bytes of JSON, too long")
            data = json.dumps({"error": str(failure)}).encode()
        message[: len(data)] = np.frombuffer(data, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(message), np.uint8)
    if failure is not None:
        raise failure
    outcome = json.loads(received.tobytes().rstrip(b"\0").decode())
    if "error" in outcome:
        raise RunDirError(f"process 0 stopped: {outcome['error']}")
    return outcome["value"]


def first_signal(received: list[int]) -> int:
    """The signal that stops training: the first one this process received (0: none), or,
    with several processes, the largest of theirs, so that all stop after the same call
    (a checkpoint is saved by all of them together)."""
    own = received[0] if received else 0
    if jax.process_count() == 1:
        return own
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(own, np.int32))))


def wait_for_primary(name: str, hours: float = 48.0) -> None:
    """Block until every process reaches the barrier `name` (process 0 reaches it when it has
    finished what only it does, e.g. the evaluation). A barrier of JAX's coordination
    service, which waits up to `hours` without spinning a collective."""
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    sync = multihost.get_barrier_sync_fn(processes=set(range(jax.process_count())))
    sync(key=f"eqicl:{name}", timeout_ms=int(hours * 3600 * 1000))
