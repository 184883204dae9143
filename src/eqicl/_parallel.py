"""Data parallelism from outside the step (STYLE §11): a one-axis `jax.sharding.Mesh` named
"data"; the training step is written for one device, its sampled batch is sharded over "data"
(`sample_train_data`), the training state is replicated, and XLA's SPMD partitioner inserts
the gradient all-reduce. Seed ensembles vmap over members around the same step, so each
member's batch is sharded the same way.
"""

import os

import jax
from jax.sharding import AxisType, Mesh

from ._config import ConfigError, TrainConfig


def initialize_distributed() -> bool:
    """`jax.distributed.initialize` when a multi-process launch is detected: explicitly via
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or a SLURM / Open MPI job
    with more than one task (JAX reads those itself). Returns whether it initialised."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None,
            process_id=int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None,
        )
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()
        return True
    return False


def num_devices(train: TrainConfig) -> int:
    """How many devices share each step's batch: `train.devices`, or with 0 the largest
    number of available devices that divides the batch."""
    available = jax.device_count()
    if train.devices > available:
        raise ConfigError(
            f"train.devices={train.devices} but only {available} devices are available"
        )
    if train.devices:
        return train.devices
    return max(k for k in range(1, available + 1) if train.batch % k == 0)


def data_mesh(train: TrainConfig) -> Mesh | None:
    """The "data" mesh for `train`, or None on one device (then nothing is sharded)."""
    k = num_devices(train)
    if k == 1:
        return None
    return jax.make_mesh((k,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:k])
