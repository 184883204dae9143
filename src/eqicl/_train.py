"""Training: an ensemble of seeds trained together, many jitted steps per call, per-step data
from `fold_in(data_key, step)`. The host loop with its checkpoints and guard: eqicl._run."""

import contextlib
import functools
import time
import typing
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from . import _faults
from ._config import Config, TrainConfig
from ._fast import Stats, per_sequence_loss, sample_stats, sample_weighted_stats
from ._model import LinearTransformer, init_transformer
from ._parallel import data_mesh, replicate
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

    model: eqx.Module  # a LinearTransformer, unless a Trainer's `init` makes another model
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


def make_optimizer(
    train: TrainConfig, schedule: optax.Schedule | None = None
) -> optax.GradientTransformation:
    """Adam with the configured schedule (`learning_rate(train)` unless given), after
    global-norm clipping (if `clip` > 0)."""
    schedule = learning_rate(train) if schedule is None else schedule
    adam = optax.adam(schedule, b1=train.b1, b2=train.b2)
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


def init_state(
    config: Config,
    member: Int[Array, ""] | int,
    optimizer: optax.GradientTransformation | None = None,
    init: Callable[[PRNGKeyArray], eqx.Module] | None = None,
) -> TrainState:
    """Ensemble member `member`'s state at step 0 (`optimizer`: `make_optimizer(config.train)`
    unless given; `init(key)`: the member's model, `init_transformer` of the config unless
    given)."""
    model_key, _ = member_keys(config.seed, member)
    if init is None:
        model = init_transformer(model_key, config.model, config.task, train_dtype(config.train))
    else:
        model = init(model_key)
    optimizer = make_optimizer(config.train) if optimizer is None else optimizer
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
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


def init_ensemble(
    config: Config,
    optimizer: optax.GradientTransformation | None = None,
    init: Callable[[PRNGKeyArray], eqx.Module] | None = None,
) -> TrainState:
    """`train.seeds` members stacked along a leading axis (`init_state`'s arguments)."""
    return eqx.filter_vmap(lambda m: init_state(config, m, optimizer, init))(
        jnp.arange(config.train.seeds)
    )


def _all_finite(tree) -> Bool[Array, ""]:
    leaves = [
        jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    ]
    return jnp.all(jnp.stack(leaves))


def _config_loss(model, data, log_weight, train: TrainConfig):
    return loss_fn(model, data, train, log_weight)


def train_step(
    state: TrainState,
    member: Int[Array, ""],
    config: Config,
    optimizer: optax.GradientTransformation | None = None,
    objective: Callable | None = None,
    sampler: Callable | None = None,
) -> tuple[TrainState, tuple[Float[Array, ""], Bool[Array, ""]]]:
    """One optimizer step on a fresh batch, its update scaled by `state.lr_scale`. A step whose
    loss or gradient is not finite is not applied (reported as skipped and counted in
    `state.skipped`). Unless given: `optimizer` is `make_optimizer(config.train)`,
    `objective(model, data, log_weight)` is `loss_fn` with `config.train`, and
    `sampler(key) -> (data, log_weight)` is `sample_train_data` of the config."""
    optimizer = make_optimizer(config.train) if optimizer is None else optimizer
    _, data_key = member_keys(config.seed, member)
    key = jr.fold_in(data_key, state.step)
    batch, log_weight = sample_train_data(key, config) if sampler is None else sampler(key)
    if objective is None:
        objective = functools.partial(_config_loss, train=config.train)
    loss, grads = eqx.filter_value_and_grad(objective)(state.model, batch, log_weight)
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


def make_train_chunk(
    config: Config,
    num_steps: int,
    optimizer: optax.GradientTransformation | None = None,
    objective: Callable | None = None,
    sampler: Callable | None = None,
):
    """A jitted function advancing every ensemble member by `num_steps` steps (one
    `lax.scan`), returning the new states and each member's per-step losses and skips
    (`train_step`'s arguments)."""
    optimizer = make_optimizer(config.train) if optimizer is None else optimizer

    def member_chunk(state, member):
        return jax.lax.scan(
            lambda s, _: train_step(s, member, config, optimizer, objective, sampler),
            state,
            None,
            length=num_steps,
        )

    @eqx.filter_jit(donate="all-except-first")
    def chunk(members: Int[Array, " members"], states: TrainState):
        return eqx.filter_vmap(member_chunk, in_axes=(0, 0))(states, members)

    return chunk


class Trainer:
    """The training of one config, built once: its learning-rate schedule and optimizer, its
    device mesh, and its jitted chunks (one compiled program per chunk length). `init()` is
    the ensemble at step 0; `advance(state)` is one jitted call of `train.steps_per_call`
    steps (fewer at the end) and returns the new state with that call's metrics. The host
    loop around it (logging, the divergence guard, checkpoints, signals) is `eqicl.run`'s
    (`eqicl.run(config, run_dir, trainer=...)`); `train_loop` is the same loop without them.

    Any part may be one's own: `init(key)` a member's model (any `eqx.Module`; default
    `init_transformer` of the config), `optimizer` any optax transformation (with the
    `schedule` it follows, for the logged rate), `objective(model, data, log_weight)` the
    loss (default `loss_fn`), `sampler(key) -> (data, log_weight)` the training data
    (default the config's task; `log_weight` None for plain sampling). The config still
    gives the steps, seeds, chunking, devices and the guard's settings.

    On several devices (`train.devices`) the state is replicated over a "data" mesh and
    every step's batch is sharded over it; the result equals one device's up to round-off.
    With several processes (eqicl._parallel) the mesh spans all of theirs."""

    def __init__(
        self,
        config: Config,
        *,
        init: Callable[[PRNGKeyArray], eqx.Module] | None = None,
        optimizer: optax.GradientTransformation | None = None,
        schedule: optax.Schedule | None = None,
        objective: Callable | None = None,
        sampler: Callable | None = None,
    ):
        self.config = config
        self.init_model, self.objective, self.sampler = init, objective, sampler
        if optimizer is None:
            self.schedule = learning_rate(config.train) if schedule is None else schedule
            self.optimizer = make_optimizer(config.train, self.schedule)
        else:  # the rate logged is the `schedule` given with it (None: not logged)
            self.schedule, self.optimizer = schedule, optimizer
        self.custom = any(p is not None for p in (init, optimizer, schedule, objective, sampler))
        self.mesh = data_mesh(config.train)
        self._chunks: dict[int, Callable] = {}
        self._abstract: TrainState | None = None

    def init(self) -> TrainState:
        return init_ensemble(self.config, self.optimizer, self.init_model)

    def abstract(self) -> TrainState:
        """The shapes and dtypes of `init()`, without computing it (traced once, then kept:
        the run checks and restores checkpoints and every rollback against it)."""
        if self._abstract is None:
            self._abstract = typing.cast(TrainState, eqx.filter_eval_shape(self.init))
        return self._abstract

    def place(self, tree):
        """Replicated over the mesh, wherever the arrays are now (a state restored from a
        checkpoint lives on one device; placing it again is a no-op). Unchanged on one
        device."""
        return tree if self.mesh is None else replicate(tree, self.mesh)

    def advance(self, state: TrainState) -> tuple[TrainState, dict]:
        """One jitted call from `state` (which must be short of `train.steps`). The metrics:
        the step reached; every member's mean loss over the call, last loss and number of
        skipped steps; the learning rate each member used at the last step (the schedule's
        times its `lr_scale`), its `lr_scale`, and the call's seconds."""
        tc = self.config.train
        k = min(tc.steps_per_call, tc.steps - int(state.step[0]))
        if k <= 0:
            raise ValueError(f"the state is at step {int(state.step[0])} of {tc.steps}")
        if k not in self._chunks:
            self._chunks[k] = make_train_chunk(
                self.config, k, self.optimizer, self.objective, self.sampler
            )
        members, state = self.place((jnp.arange(tc.seeds), state))
        t0 = time.perf_counter()
        with contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh):
            state, (losses, skipped) = self._chunks[k](members, state)
        losses, skipped = jax.device_get((losses, skipped))
        step = int(state.step[0])
        # optax types a schedule's value as any array-like; it is a float or a scalar array.
        rate = (
            None
            if self.schedule is None
            else float(typing.cast(float | jax.Array, self.schedule(step - 1)))
        )
        lr_scale = [float(v) for v in np.asarray(state.lr_scale)]
        metrics = {
            "step": step,
            "loss": [float(v) for v in losses.mean(axis=1)],
            "last_loss": [float(v) for v in losses[:, -1]],
            "skipped": [int(v) for v in skipped.sum(axis=1)],
            "lr": None if rate is None else [rate * v for v in lr_scale],
            "lr_scale": lr_scale,
            "seconds": time.perf_counter() - t0,
            # Where the call ran (not part of the run's identity: see eqicl._run.NOT_IDENTITY).
            "devices": 1 if self.mesh is None else self.mesh.size,
            "processes": jax.process_count(),
        }
        return state, metrics


def train_loop(config: Config, state: TrainState | None = None) -> TrainState:
    """Advance a stacked ensemble state (default: `init_ensemble(config)`) to `train.steps`,
    `train.steps_per_call` steps per jitted call, with nothing around it: no logging, no
    divergence guard, no checkpoints (`eqicl.run` has them)."""
    trainer = Trainer(config)
    state = trainer.init() if state is None else state
    while int(state.step[0]) < config.train.steps:
        state, _ = trainer.advance(state)
    return state
