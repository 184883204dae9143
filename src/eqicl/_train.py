"""Training: an ensemble of seeds trained together, many jitted steps per call, per-step data
from `fold_in(data_key, step)`, orbax checkpoints, resume by default."""

import contextlib
import json
import os
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from . import _faults
from ._config import Config, TrainConfig
from ._fast import Stats, per_sequence_loss, sample_stats, sample_weighted_stats
from ._model import LinearTransformer, init_transformer
from ._parallel import data_mesh
from ._task import Batch, batch_oracle_weights, prng_key, sample_batch

LOSS_WINDOW = 16  # jitted calls whose mean loss the explosion check takes the median of


class TrainState(eqx.Module):
    """Everything a resumed run needs: the model, the optimizer state, the step count and the
    divergence guard's bookkeeping. The guard's fields live here, so they are checkpointed
    with the model and a resumed run takes exactly the same rollbacks as an uninterrupted one.

    `lr_scale` multiplies every update (for Adam that is exactly a smaller learning rate) and
    is lowered at each rollback; `rollbacks` counts them (above `train.max_rollbacks`: given
    up); `skipped` counts non-finite steps since the last scheduled checkpoint or rollback;
    `recent` holds the mean loss of the last `LOSS_WINDOW` jitted calls (NaN: none yet).
    """

    model: LinearTransformer
    opt_state: optax.OptState
    step: Int[Array, ""]
    lr_scale: Float[Array, ""]
    rollbacks: Int[Array, ""]
    skipped: Int[Array, ""]
    recent: Float[Array, " window"]


def train_dtype(train: TrainConfig):
    return jnp.float64 if train.dtype == "float64" else jnp.float32


def member_keys(seed: int, member: Int[Array, ""] | int) -> tuple[PRNGKeyArray, PRNGKeyArray]:
    """(model_key, data_key) of ensemble member `member`."""
    model_key, data_key = jr.split(jr.fold_in(prng_key(seed), member))
    return model_key, data_key


def learning_rate(train: TrainConfig) -> optax.Schedule:
    if train.schedule == "constant":
        if train.warmup:
            return optax.linear_schedule(0.0, train.lr, train.warmup)
        return optax.constant_schedule(train.lr)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.lr,
        warmup_steps=min(train.warmup, train.steps - 1),
        decay_steps=train.steps,
        end_value=train.lr * 1e-2,
    )


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """Adam with the configured schedule, after global-norm clipping (if `clip` > 0)."""
    adam = optax.adam(learning_rate(train), b1=train.b1, b2=train.b2)
    if train.clip > 0:
        return optax.chain(optax.clip_by_global_norm(train.clip), adam)
    return adam


def loss_fn(
    model: LinearTransformer,
    batch: Batch | Stats,
    train: TrainConfig,
    log_weight: Float[Array, " batch"] | None = None,
) -> Float[Array, ""]:
    """Training loss. `exact`: ½‖w^L − μ‖² (adjusted loss, no query or posterior noise);
    `sampled`: ½(ŷ − y_t)². With `log_weight` (sequences drawn from an importance-sampling
    proposal, `eqicl.sample_weighted_stats`) each sequence's loss is multiplied by its weight
    f/q, so the mean is unbiased for the task's expectation. Each sequence's (weighted) loss
    is then capped at `loss_clip` (if > 0), hard or soft (`loss_cap`).

    A `Stats` batch runs the statistics formulation (eqicl._fast, the default); a `Batch`
    runs the paper's token equation through `LinearTransformer` (the reference)."""
    if isinstance(batch, Stats):
        per_seq = per_sequence_loss(model, batch, train.objective)
    elif train.objective == "exact":
        w = jax.vmap(model.implicit_weights)(batch.x, batch.y)[:, -1]
        mu = batch_oracle_weights(batch.x, batch.y, batch.sigma)
        per_seq = 0.5 * jnp.sum((w - mu) ** 2, axis=-1)
    else:
        pred = jax.vmap(model.predict)(batch.x, batch.y, batch.xq)
        per_seq = 0.5 * (pred - batch.yq) ** 2
    if log_weight is not None:
        per_seq = per_seq * jnp.exp(log_weight).astype(per_seq.dtype)
    if train.loss_clip > 0 and train.loss_cap == "soft":
        per_seq = train.loss_clip * jnp.log1p(per_seq / train.loss_clip)
    elif train.loss_clip > 0:
        per_seq = jnp.minimum(per_seq, train.loss_clip)
    return jnp.mean(per_seq)


def sample_train_data(
    key: PRNGKeyArray, config: Config
) -> tuple[Batch | Stats, Float[Array, " batch"] | None]:
    """One step's batch in the form `train.formulation` consumes, and its sequences' log
    importance weights (None under the task's own law, `train.proposal_*` plain). Under a
    mesh with a "data" axis (see `train_loop`) the batch axis is sharded over it."""
    tc = config.train
    if tc.formulation == "stats":
        proposal = tc.proposal
        if proposal.plain:
            return sample_stats(key, config.task, tc.batch, train_dtype(tc), tc.sampler), None
        return sample_weighted_stats(
            key, config.task, tc.batch, proposal, train_dtype(tc), tc.sampler
        )
    batch = sample_batch(key, config.task, tc.batch, train_dtype(tc))
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and "data" in mesh.axis_names:
        spec = jax.sharding.PartitionSpec("data")
        batch = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, spec), batch)
    return batch, None


def init_state(config: Config, member: Int[Array, ""] | int) -> TrainState:
    model_key, _ = member_keys(config.seed, member)
    model = init_transformer(model_key, config.model, config.task, train_dtype(config.train))
    opt_state = make_optimizer(config.train).init(eqx.filter(model, eqx.is_inexact_array))
    dtype = train_dtype(config.train)
    return TrainState(
        model=model,
        opt_state=opt_state,
        step=jnp.zeros((), jnp.int32),
        lr_scale=jnp.ones((), dtype),
        rollbacks=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
        recent=jnp.full((LOSS_WINDOW,), jnp.nan, dtype),
    )


def init_ensemble(config: Config) -> TrainState:
    """`train.seeds` members stacked along a leading axis."""
    return eqx.filter_vmap(lambda m: init_state(config, m))(jnp.arange(config.train.seeds))


def _all_finite(tree) -> Bool[Array, ""]:
    leaves = [
        jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    ]
    return jnp.all(jnp.stack(leaves))


def train_step(
    state: TrainState, member: Int[Array, ""], config: Config
) -> tuple[TrainState, tuple[Float[Array, ""], Bool[Array, ""]]]:
    """One optimizer step on a fresh batch, its update scaled by `state.lr_scale`. A step whose
    loss or gradient is not finite is not applied (reported as skipped and counted in
    `state.skipped`)."""
    optimizer = make_optimizer(config.train)
    _, data_key = member_keys(config.seed, member)
    batch, log_weight = sample_train_data(jr.fold_in(data_key, state.step), config)
    loss, grads = eqx.filter_value_and_grad(loss_fn)(state.model, batch, config.train, log_weight)
    loss, grads = _faults.corrupt_gradient(loss, grads, state.step, member, state.rollbacks)
    params = eqx.filter(state.model, eqx.is_inexact_array)
    # optax mixes Python floats with its int32 step count (bias correction, schedules), which
    # strict dtype promotion (on in the tests) rejects; the standard rules are exact here.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
    # Scaling Adam's output is scaling its learning rate, and leaves its moments untouched.
    updates = jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), updates)
    model = eqx.apply_updates(state.model, updates)
    ok = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(model)
    model, opt_state = jax.tree.map(
        lambda new, old: jnp.where(ok, new, old) if eqx.is_array(new) else new,
        (model, opt_state),
        (state.model, state.opt_state),
    )
    new = TrainState(
        model=model,
        opt_state=opt_state,
        step=state.step + 1,
        lr_scale=state.lr_scale,
        rollbacks=state.rollbacks,
        skipped=state.skipped + (~ok).astype(state.skipped.dtype),
        recent=state.recent,
    )
    return new, (loss, ~ok)


def make_train_chunk(config: Config, num_steps: int):
    """A jitted function advancing every ensemble member by `num_steps` steps (one
    `lax.scan`), returning the new states and each member's per-step losses and skips."""

    def member_chunk(state, member):
        return jax.lax.scan(
            lambda s, _: train_step(s, member, config), state, None, length=num_steps
        )

    @eqx.filter_jit(donate="all-except-first")
    def chunk(members: Int[Array, " members"], states: TrainState):
        return eqx.filter_vmap(member_chunk, in_axes=(0, 0))(states, members)

    return chunk


def train_loop(
    config: Config,
    state: TrainState,
    on_chunk: Callable[[TrainState, dict], TrainState | None] | None = None,
) -> TrainState:
    """Advance a stacked ensemble state to `train.steps`, `train.steps_per_call` steps per call.
    `on_chunk(state, metrics)` runs after every call (logging, checkpoints, the divergence
    guard); if it returns a state, training continues from that one (e.g. a rollback).

    On several devices (`train.devices`) the state is replicated over a "data" mesh and
    every step's batch is sharded over it; the result equals one device's up to round-off."""
    tc = config.train
    members = jnp.arange(tc.seeds)
    chunks: dict[int, Callable] = {}
    step = int(state.step[0])
    schedule = learning_rate(tc)
    mesh = data_mesh(tc)
    if mesh is not None:
        replicated = NamedSharding(mesh, PartitionSpec())
        state = eqx.filter_shard(state, replicated)
        members = eqx.filter_shard(members, replicated)
    while step < tc.steps:
        k = min(tc.steps_per_call, tc.steps - step)
        if k not in chunks:
            chunks[k] = make_train_chunk(config, k)
        t0 = time.perf_counter()
        with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
            state, (losses, skipped) = chunks[k](members, state)
        losses = jax.device_get(losses)
        step = int(state.step[0])
        metrics = {
            "step": step,
            "loss": [float(v) for v in losses.mean(axis=1)],
            "last_loss": [float(v) for v in losses[:, -1]],
            "skipped": [int(v) for v in jax.device_get(skipped).sum(axis=1)],
            "lr": float(schedule(step - 1)),
            "seconds": time.perf_counter() - t0,
        }
        if on_chunk is not None:
            replaced = on_chunk(state, metrics)
            if replaced is not None:
                state = replaced
                step = int(state.step[0])
    return state


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
