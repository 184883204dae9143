"""Typed, frozen run configuration, named presets and type-checked CLI overrides."""

import abc
import collections.abc
import dataclasses
import json
import math
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration that cannot be run. The message is one line, meant for the user."""


# Integer fields become int32 arrays (the step counter, seeds, shapes under jit): a config
# beyond that range would train into an overflow or fail after training.
INT32_MAX = 2**31 - 1


def _check_ints(section, prefix: str) -> None:
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.type is int and isinstance(value, int) and not -INT32_MAX <= value <= INT32_MAX:
            raise ConfigError(
                f"{prefix}{f.name} must be at most {INT32_MAX:,} (int32), got {value:.3g}"
            )


NoiseKind = Literal["uniform", "categorical", "fixed"]


class NoiseLaw(abc.ABC):
    """A law of the per-sequence noise level σ_τ of one's own, given as `TaskConfig(noise=law)`
    in place of a built-in kind: training (both samplers), evaluation, the baselines and the
    parameter units all draw σ_τ from it. Write it as a frozen dataclass (configs are hashed
    as static arguments of jitted functions). Such a task lives in Python only: a run
    directory's config.json holds the built-in kinds, so `eqicl.run` refuses it in one line;
    train it with `eqicl.Trainer` / `eqicl.train_loop` and score it with `eqicl.evaluate`."""

    @abc.abstractmethod
    def sample(self, key, batch: int, dtype):
        """σ_τ of `batch` sequences (a JAX array of shape (batch,), every value >= 0)."""

    @property
    @abc.abstractmethod
    def mean_sigma2(self) -> float:
        """E[σ_τ²]."""

    @property
    @abc.abstractmethod
    def sigma_range(self) -> float:
        """The largest σ_τ the law draws (the profile's grid reaches past it)."""

    @property
    def label(self) -> str:
        """The task's noise in tables and messages."""
        return type(self).__name__


# The kinds of eqicl._model.VARIANTS (this module cannot import the layer classes; a test
# checks that the two lists agree).
ModelKind = Literal["full", "diag", "gdpp"]


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Noisy linear regression (SPEC §1).

    `noise` picks how the per-sequence noise standard deviation σ_τ is drawn:
    `uniform` σ_τ ~ U(0, sigma_max); `categorical` σ_τ uniform over `sigma_set`;
    `fixed` σ_τ = `sigma`. The fields of the other kinds are ignored.
    """

    d: int = 10
    n: int = 20
    noise: NoiseKind | NoiseLaw = "uniform"
    sigma_max: float = 3.0
    sigma_set: tuple[float, ...] = (1.0, 3.0)
    sigma: float = 1.0

    def __post_init__(self):
        _check_ints(self, "task.")
        if self.d < 1:
            raise ConfigError(f"task.d must be >= 1, got {self.d}")
        if self.n < 1:
            raise ConfigError(f"task.n must be >= 1, got {self.n}")
        if isinstance(self.noise, NoiseLaw):
            try:
                hash(self.noise)
            except TypeError:
                raise ConfigError(
                    f"task.noise: a {type(self.noise).__name__} must be hashable (write it as a "
                    "frozen dataclass): configs are static arguments of jitted functions"
                ) from None
        elif self.noise not in typing.get_args(NoiseKind):
            raise ConfigError(
                f"task.noise must be one of {typing.get_args(NoiseKind)}, got {self.noise!r}"
            )
        # Every noise field is checked, also those the kind ignores: a run directory must be
        # reopenable, so no field may hold a value that never equals itself (NaN).
        if not (0 <= self.sigma_max < math.inf):
            raise ConfigError(f"task.sigma_max must be finite and >= 0, got {self.sigma_max}")
        if self.noise == "categorical" and len(self.sigma_set) == 0:
            raise ConfigError("task.sigma_set must hold at least one noise level")
        if any(not (0 <= s < math.inf) for s in self.sigma_set):
            raise ConfigError(f"task.sigma_set must be finite and >= 0, got {self.sigma_set}")
        if not (0 <= self.sigma < math.inf):
            raise ConfigError(f"task.sigma must be finite and >= 0, got {self.sigma}")

    @property
    def mean_sigma2(self) -> float:
        """E[σ_τ²] under the task's noise distribution."""
        if isinstance(self.noise, NoiseLaw):
            return self.noise.mean_sigma2
        if self.noise == "uniform":
            return self.sigma_max**2 / 3
        if self.noise == "categorical":
            return sum(s**2 for s in self.sigma_set) / len(self.sigma_set)
        return self.sigma**2

    @property
    def sigma_range(self) -> float:
        """The largest σ_τ the task can draw."""
        if isinstance(self.noise, NoiseLaw):
            return self.noise.sigma_range
        if self.noise == "uniform":
            return self.sigma_max
        if self.noise == "categorical":
            return max(self.sigma_set)
        return self.sigma

    @property
    def label(self) -> str:
        """The noise column of the paper's Table 1 ("3", "{1;3}", ...), or a descriptive label."""
        if isinstance(self.noise, NoiseLaw):
            return self.noise.label
        if self.noise == "uniform":
            return _num(self.sigma_max)
        if self.noise == "categorical":
            return "{" + ";".join(_num(s) for s in self.sigma_set) + "}"
        return f"fixed {_num(self.sigma)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Linear transformer (SPEC §2).

    `units="scaled"` parameterizes each layer in units of the typical size of the context
    statistics (Σ/n, α/(n s), λ/(n s²), s² = d + E[σ²]): the same function class, better
    conditioned for Adam. `init="gd"` starts every layer as a stable gradient-descent step
    in those units plus `init_scale` noise; `init="normal"` draws all parameters
    N(0, init_scale²).

    `init_from` (a weights file written by `eqicl.save_weights`, e.g. a Table 1 cell's
    `runs/paper/weights/<cell>.npz`) starts from a trained model of the same d instead,
    embedded exactly: one layer fewer of the same kind gets an identity layer in front
    (P = `init_scale` noise, Q as in the GD start); the same depth of a narrower kind
    (GD++ into DIAG or FULL, DIAG into FULL) is written in the wider parameterization, the new
    degrees of freedom set to `init_scale` noise (FULL: noise on all of P). A file trained for
    another noise setting (other units) is rewritten in this run's units: the same function.
    """

    kind: str = "diag"  # a ModelKind, or the kind of a registered layer class
    layers: int = 3
    heads: int = 1
    units: Literal["scaled", "paper"] = "scaled"
    init: Literal["gd", "normal"] = "gd"
    init_scale: float = 1e-3
    init_from: str = ""

    def __post_init__(self):
        _check_ints(self, "model.")
        # eqicl's kinds and those `eqicl.register_layer` added (eqicl._model owns the classes;
        # importing it here, not at the top, keeps the two modules out of an import cycle).
        from ._model import layer_classes

        if self.kind not in typing.get_args(ModelKind) and self.kind not in layer_classes():
            known = tuple(layer_classes())
            raise ConfigError(
                f"model.kind must be one of {known}, got {self.kind!r} (a layer class of one's "
                "own: eqicl.register_layer(cls) before the config is read)"
            )
        if self.layers < 1:
            raise ConfigError(f"model.layers must be >= 1, got {self.layers}")
        if self.heads < 1:
            raise ConfigError(f"model.heads must be >= 1, got {self.heads}")
        if self.units not in ("scaled", "paper"):
            raise ConfigError(f"model.units must be 'scaled' or 'paper', got {self.units!r}")
        if self.init not in ("gd", "normal"):
            raise ConfigError(f"model.init must be 'gd' or 'normal', got {self.init!r}")
        if not (0 <= self.init_scale < math.inf):
            raise ConfigError(f"model.init_scale must be finite and >= 0, got {self.init_scale}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation. `objective="exact"` trains on ½‖w^L − μ‖² (SPEC §5), `"sampled"` on
    ½(ŷ − y_t)²; `loss_clip` caps each sequence's loss (0 disables it): `loss_cap="hard"` as
    min(ℓ, c), which gives a sequence beyond the cap no gradient at all, `"soft"` as
    c·log(1 + ℓ/c), which bounds its pull but still pushes it down. With an
    importance-sampling proposal (`proposal_x`, `proposal_w`, `proposal_shares`, see
    `eqicl.Proposal`; the default is the task's own law) each batch is drawn from the proposal
    and each sequence's loss is weighted by f/q before the cap, so that the objective is
    unbiased for the task's expectation and reaches its rare sequences; the cap is then best
    a numerical guard far above typical losses. It needs the statistics formulation, and
    float64 where models can overflow float32 on the proposal's heavier sequences.

    `formulation="stats"` runs the forward pass on the D×D context statistics (Theorem 4.1,
    n-independent), through eqicl's compiled CPU kernel on a single CPU device and in XLA
    elsewhere; `"tokens"` runs the paper's token equation in XLA (the reference). Both give
    the same result to round-off; see README "Performance".
    `sampler="wishart"` draws the statistics directly from their exact distribution in the CPU
    kernel (stats formulation only; the cost does not grow with n; where the kernel does not
    apply, tokens are sampled: same law, other draws); `"tokens"` samples the tokens
    (`sample_batch`, the very sequences the token formulation sees).
    `devices`: data-parallel devices sharing each step's batch (0: every local device whose
    count divides the batch; results equal a single device's up to round-off).

    Divergence guard: a step whose loss or gradient is not finite is skipped. A seed that
    skips `max_skipped` steps since the last checkpoint, or whose mean loss over one jitted
    call exceeds `explode_factor` × the median of its last calls (and `explode_floor`: near a
    tiny optimum, as for noiseless tasks, 10× spikes are noise, not divergence), is rolled back with the
    rest of the ensemble to the last good checkpoint and continues with its learning rate
    multiplied by `lr_backoff`; after `max_rollbacks` such rollbacks it is given up (left out
    of the best-of-seeds selection). 0 disables `max_skipped` / `explode_factor`.
    """

    steps: int = 3000
    batch: int = 512
    lr: float = 1e-2
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup: int = 500
    clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    objective: Literal["exact", "sampled"] = "exact"
    loss_clip: float = 20.0
    loss_cap: Literal["hard", "soft"] = "soft"
    dtype: Literal["float32", "float64"] = "float32"
    seeds: int = 1
    steps_per_call: int = 100
    checkpoint_every: int = 1000
    # The held-out validation draws every choice between candidates ranks on
    # (eqicl._evaluate.verdict): this many plain sequences, and as many from the proposal below.
    select_sequences: int = 400_000
    # The training sequences' law: an importance-sampling proposal (eqicl.Proposal; the
    # default (1,), (1,), (1,) is the task's own law) whose weights keep the objective unbiased.
    proposal_x: tuple[float, ...] = (1.0,)
    proposal_w: tuple[float, ...] = (1.0,)
    proposal_shares: tuple[float, ...] = (1.0,)
    # The selection's proposal (eqicl.SELECT): `select_sequences` held-out sequences beside
    # the plain ones, importance-weighted, so that a candidate whose expectation sequences
    # just beyond a plain draw's reach carry is seen (rank TAIL).
    select_proposal_x: tuple[float, ...] = (1.0, 1.1, 1.2)
    select_proposal_w: tuple[float, ...] = (1.0, 1.0, 1.1)
    select_proposal_shares: tuple[float, ...] = (0.5, 0.25, 0.25)
    # Performance (results unchanged to round-off; see README "Performance"):
    formulation: Literal["stats", "tokens"] = "stats"
    sampler: Literal["wishart", "tokens"] = "wishart"
    devices: int = 0
    max_skipped: int = 10
    explode_factor: float = 10.0
    explode_floor: float = 0.1
    lr_backoff: float = 0.5
    max_rollbacks: int = 5

    def __post_init__(self):
        _check_ints(self, "train.")
        for name in ("steps", "batch", "seeds", "steps_per_call", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.devices < 0:
            raise ConfigError(f"train.devices must be >= 0 (0: all), got {self.devices}")
        if self.devices > 0 and self.batch % self.devices:
            raise ConfigError(
                f"train.batch ({self.batch}) must be a multiple of train.devices ({self.devices})"
            )
        if self.formulation not in ("stats", "tokens"):
            raise ConfigError(
                f"train.formulation must be 'stats' or 'tokens', got {self.formulation!r}"
            )
        if self.sampler not in ("wishart", "tokens"):
            raise ConfigError(f"train.sampler must be 'wishart' or 'tokens', got {self.sampler!r}")
        if self.warmup < 0:
            raise ConfigError(f"train.warmup must be >= 0, got {self.warmup}")
        if self.select_sequences < 1:
            raise ConfigError(f"train.select_sequences must be >= 1, got {self.select_sequences}")
        if not (0 < self.lr < math.inf):
            raise ConfigError(f"train.lr must be positive and finite, got {self.lr}")
        if not (0 <= self.clip < math.inf):
            raise ConfigError(
                f"train.clip must be finite and >= 0 (0 disables it), got {self.clip}"
            )
        if self.loss_cap not in ("hard", "soft"):
            raise ConfigError(f"train.loss_cap must be 'hard' or 'soft', got {self.loss_cap!r}")
        if not (0 <= self.loss_clip < math.inf):
            raise ConfigError(
                f"train.loss_clip must be finite and >= 0 (0 disables it), got {self.loss_clip}"
            )
        for name in ("max_skipped", "max_rollbacks"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.explode_floor < math.inf):
            raise ConfigError(
                f"train.explode_floor must be finite and >= 0, got {self.explode_floor}"
            )
        if not (self.explode_factor == 0 or 1 < self.explode_factor < math.inf):
            raise ConfigError(
                "train.explode_factor must be > 1 and finite (0 disables it), "
                f"got {self.explode_factor}"
            )
        if not (0 < self.lr_backoff < 1):
            raise ConfigError(f"train.lr_backoff must be in (0, 1), got {self.lr_backoff}")
        for name in ("b1", "b2"):
            if not (0 <= getattr(self, name) < 1):
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(
                f"train.schedule must be 'cosine' or 'constant', got {self.schedule!r}"
            )
        if self.objective not in ("exact", "sampled"):
            raise ConfigError(
                f"train.objective must be 'exact' or 'sampled', got {self.objective!r}"
            )
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"train.dtype must be 'float32' or 'float64', got {self.dtype!r}")
        _proposal(self, "train", "select_proposal")
        proposal = _proposal(self, "train")
        if not proposal.plain and self.formulation != "stats":
            raise ConfigError(
                "train.proposal_* (importance-sampled training) needs train.formulation=stats"
            )
        if self.checkpoint_every % self.steps_per_call:
            raise ConfigError(
                f"train.checkpoint_every ({self.checkpoint_every}) must be a multiple of "
                f"train.steps_per_call ({self.steps_per_call}) so that a resumed run replays "
                "exactly the same jitted calls"
            )

    @property
    def proposal(self):
        """The training sequences' proposal (an `eqicl.Proposal`; plain by default)."""
        return _proposal(self, "train")

    @property
    def select_proposal(self):
        """The selection's proposal (an `eqicl.Proposal`; `eqicl.SELECT` by default)."""
        return _proposal(self, "train", "select_proposal")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation: `sequences` fresh test sequences (the paper: 100,000), baselines tuned on
    `tune_sequences` others, per-variance profile on `profile_points` σ values up to
    `profile_factor` × the largest training σ, and the tail-aware estimate of the same
    expectation on `tail_sequences` sequences from the proposal `proposal_*` (SPEC §9,
    `eqicl.Proposal`)."""

    sequences: int = 100_000
    tune_sequences: int = 20_000
    chunk: int = 10_000
    profile_points: int = 25
    profile_sequences: int = 5_000
    profile_factor: float = 1.5
    seed: int = 12345
    # The tail-aware estimate (SPEC §9) beside the plain one: `tail_sequences` sequences from
    # this proposal (eqicl.DEFAULT), importance-weighted.
    tail_sequences: int = 100_000
    proposal_x: tuple[float, ...] = (1.0, 1.25, 1.5)
    proposal_w: tuple[float, ...] = (1.0, 1.0, 1.25)
    proposal_shares: tuple[float, ...] = (0.5, 0.25, 0.25)

    def __post_init__(self):
        _check_ints(self, "eval.")
        for name in ("sequences", "tune_sequences", "chunk", "profile_points", "profile_sequences"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sequences", "profile_sequences"):
            if getattr(self, name) < 2:
                raise ConfigError(
                    f"eval.{name} must be >= 2 (a standard error needs two), "
                    f"got {getattr(self, name)}"
                )
        if not (0 <= self.seed <= INT32_MAX):
            raise ConfigError(f"eval.seed must be in [0, {INT32_MAX}], got {self.seed:.3g}")
        if not (0 < self.profile_factor < math.inf):
            raise ConfigError(f"eval.profile_factor must be positive, got {self.profile_factor}")
        if self.tail_sequences < 2:
            raise ConfigError(f"eval.tail_sequences must be >= 2, got {self.tail_sequences}")
        _proposal(self, "eval")

    @property
    def proposal(self):
        """The tail-aware estimate's proposal (an `eqicl.Proposal`)."""
        return _proposal(self, "eval")


def _proposal(section, name: str, prefix: str = "proposal"):
    """The `eqicl.Proposal` of a config section's `<prefix>_x/_w/_shares` fields (ConfigError
    if bad)."""
    from ._tail import Proposal

    x, w, shares = (getattr(section, f"{prefix}_{k}") for k in ("x", "w", "shares"))
    try:
        return Proposal(x, w, shares)
    except ConfigError as e:
        raise ConfigError(f"{name}.{prefix}_x/_w/_shares: {e}") from None


@dataclasses.dataclass(frozen=True)
class Config:
    task: TaskConfig = TaskConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.seed, int) and 0 <= self.seed <= INT32_MAX):
            raise ConfigError(f"seed must be an integer in [0, {INT32_MAX}], got {self.seed:.3g}")

    def to_dict(self) -> dict[str, Any]:
        if isinstance(self.task.noise, NoiseLaw):
            raise ConfigError(
                f"task.noise is a {type(self.task.noise).__name__} (an eqicl.NoiseLaw of one's "
                "own): a config.json holds only the built-in kinds; use eqicl.Trainer / "
                "eqicl.train_loop and eqicl.evaluate for it"
            )
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        sections = {}
        for f in dataclasses.fields(cls):
            if f.name == "seed":
                continue
            sub = data.get(f.name, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"config section {f.name} must be a JSON object, got {sub!r}")
            sub_cls = f.type
            assert isinstance(sub_cls, type)  # a section's dataclass (annotations not postponed)
            known = {g.name for g in dataclasses.fields(sub_cls)}
            unknown = set(sub) - known
            if unknown:
                raise ConfigError(f"unknown config key {f.name}.{sorted(unknown)[0]}")
            sections[f.name] = sub_cls(
                **{k: _coerce(v, _field_type(sub_cls, k), f"{f.name}.{k}") for k, v in sub.items()}
            )
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config key {sorted(unknown)[0]}")
        return cls(**sections, seed=_coerce(data.get("seed", 0), int, "seed"))


def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a JSON value (or a CLI string) to the field's type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # a kind or an object (NoiseLaw): text is a kind
        (tp,) = [t for t in typing.get_args(tp) if typing.get_origin(t) is Literal]
        origin = Literal
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
        return value
    if origin is tuple:
        (elem, _) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.strip("()[]{} ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a comma-separated list, got {value!r}")
        return tuple(_coerce(v, elem, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if tp is str:
        return str(value)
    raise TypeError(f"unsupported config field type {tp} for {key}")  # pragma: no cover


def _parse_override(assignment: str) -> tuple[str, str | None, str]:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form section.field=value")
    key, value = assignment.split("=", 1)
    key = key.strip()
    if key == "seed":
        return "seed", None, value
    if key.count(".") != 1:
        raise ConfigError(f"unknown config key {key!r} (expected section.field, e.g. train.lr)")
    section, name = key.split(".")
    sections = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "seed"}
    if section not in sections:
        raise ConfigError(
            f"unknown config section {section!r} (one of {', '.join(sorted(sections))})"
        )
    sub_cls = sections[section]
    assert isinstance(sub_cls, type)  # a section's dataclass (annotations not postponed)
    fields = {f.name for f in dataclasses.fields(sub_cls)}
    if name not in fields:
        raise ConfigError(
            f"unknown config key {key!r} (fields of {section}: {', '.join(sorted(fields))})"
        )
    return section, name, value


def override(config: Config, assignments: collections.abc.Sequence[str]) -> Config:
    """Apply `section.field=value` (or `seed=value`) overrides, each type-checked against its
    field; cross-field checks run once, after all of them. A task's own NoiseLaw is kept
    (unless `task.noise` is overridden)."""
    law = config.task.noise if isinstance(config.task.noise, NoiseLaw) else None
    if law is not None:  # the dict form holds only the built-in kinds
        config = dataclasses.replace(config, task=dataclasses.replace(config.task, noise="uniform"))
    data = config.to_dict()
    for assignment in assignments:
        section, name, value = _parse_override(assignment)
        if name is None:
            data["seed"] = value
        else:
            data[section][name] = value
            if (section, name) == ("task", "noise"):
                law = None
    out = Config.from_dict(data)
    if law is not None:
        out = dataclasses.replace(out, task=dataclasses.replace(out.task, noise=law))
    return out


def _tiny() -> Config:
    return Config(
        task=TaskConfig(d=4, n=8, noise="uniform", sigma_max=1.0),
        model=ModelConfig(kind="diag", layers=2),
        train=TrainConfig(
            steps=40,
            batch=32,
            lr=1e-2,
            warmup=5,
            seeds=2,
            steps_per_call=10,
            checkpoint_every=20,
            select_sequences=256,
        ),
        eval=EvalConfig(
            sequences=2_000,
            tune_sequences=1_000,
            chunk=1_000,
            profile_points=5,
            profile_sequences=200,
            tail_sequences=2_000,
        ),
    )


def _default() -> Config:
    return Config(
        task=TaskConfig(noise="uniform", sigma_max=3.0),
        model=ModelConfig(kind="diag", layers=3),
        train=TrainConfig(steps=3000, batch=512, lr=3e-2, warmup=300, seeds=1),
    )


def _paper() -> Config:
    # SPEC §3: Adam 1e-4, batch 2048, 200k steps, best of 5 seeds, in the paper's units.
    return Config(
        task=TaskConfig(noise="uniform", sigma_max=3.0),
        model=ModelConfig(kind="diag", layers=3, units="paper", init="normal", init_scale=1e-3),
        train=TrainConfig(
            steps=200_000,
            batch=2048,
            lr=1e-4,
            schedule="constant",
            warmup=0,
            clip=0.0,
            objective="sampled",
            loss_clip=0.0,
            seeds=5,
            checkpoint_every=10_000,
        ),
    )


PRESETS: dict[str, types.FunctionType] = {"tiny": _tiny, "default": _default, "paper": _paper}


def preset(name: str, overrides: collections.abc.Sequence[str] = ()) -> Config:
    """A named preset (`tiny`, `default`, `paper`) with `section.field=value` overrides applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (one of {', '.join(PRESETS)})")
    return override(PRESETS[name](), overrides)
