"""Linear self-attention layers (FULL, DIAG, GD++) and the linear transformer (SPEC §2).

Every layer maps the context statistics S = Σ_{j≤n} e_j e_jᵀ (the query tokens excluded,
not divided by n) to the operator T = Σ_k P_k S Q_k and updates every token,
e_i ← e_i + T e_i. Parameters may be stored in *scaled units* (`scale_n`, `scale_s`):
the paper-unit matrices are P_k diag(1, …, 1, 1/s) / n and diag(1, …, 1, 1/s) Q_k, which is
the same function class with each statistic measured in its typical size (SPEC §8).
"""

import abc
import dataclasses
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._config import ConfigError, ModelConfig, TaskConfig


def _unit_diag(d: int, s: float, dtype) -> Float[Array, " D"]:
    return jnp.concatenate([jnp.ones((d,), dtype), jnp.full((1,), 1.0 / s, dtype)])


def context_statistics(tokens: Float[Array, "m D"], n: int) -> Float[Array, "D D"]:
    """S = Σ_{j=1}^{n} e_j e_jᵀ over the first `n` tokens (the context; queries excluded)."""
    ctx = tokens[:n]
    return ctx.T @ ctx


class AbstractLinearAttention(eqx.Module):
    """One residual linear self-attention layer, e_i ← e_i + Σ_k P_k S Q_k e_i.

    A variant is one concrete subclass. Its class attributes and class methods are all that
    the generic code (configs, weights files, warm starts, units, the CPU kernel) needs:

    - `kind`: its name in `model.kind` and in a weights file; `label`: its name in the paper;
    - `fields`: its parameter arrays, as a weights file stores them; the first one holds P
      (zero P: the identity layer) and has the heads on its leading axis;
    - `embeds`: the kinds whose models it can start from at the same depth (itself
      included), by `embed`;
    - `init_arrays`, `from_arrays` / `stacked`, `rescaled`, `embed` and `kernel_operands`.

    `VARIANTS` maps every kind to its class; a config accepts a kind listed in
    `eqicl._config.ModelKind` too (that module cannot import these classes; a test checks
    that the two lists agree).
    """

    kind: ClassVar[str]
    label: ClassVar[str]
    fields: ClassVar[tuple[str, ...]]
    embeds: ClassVar[tuple[str, ...]]
    # Whether `operator` is the whole layer (e ← e + e Tᵀ, T = operator(S), as `__call__`
    # below): then the statistics formulation and the CPU kernel, which read only `operator`
    # (or `kernel_operands`), compute what the layer computes. A subclass that overrides
    # `__call__` is taken not to be unless it sets this itself (`__init_subclass__`); its
    # models are then computed on the tokens wherever eqicl can, and refused where only the
    # statistics exist (`UnknownLayer`).
    statistics_exact: ClassVar[bool] = True

    scale_n: eqx.AbstractVar[float]
    scale_s: eqx.AbstractVar[float]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__ and "statistics_exact" not in cls.__dict__:
            cls.statistics_exact = False

    @property
    @abc.abstractmethod
    def d(self) -> int:
        """The input dimension d (tokens have D = d + 1 coordinates)."""

    @abc.abstractmethod
    def raw_pq(self) -> tuple[Float[Array, "heads D D"], Float[Array, "heads D D"]]:
        """P_k and Q_k in the layer's own (possibly scaled) units."""

    @abc.abstractmethod
    def operator(self, stats: Float[Array, "D D"]) -> Float[Array, "D D"]:
        """T = Σ_k P_k S Q_k in paper units, from the context statistics S."""

    @classmethod
    @abc.abstractmethod
    def init_arrays(
        cls, key: PRNGKeyArray, heads: int, d: int, scale: float, gd: float | None, dtype
    ) -> dict:
        """Fresh parameter arrays: N(0, scale²), plus (unless `gd` is None) the gradient step
        y_i ← y_i − gd <α, x_i> in the layer's own units in head 0."""

    @classmethod
    @abc.abstractmethod
    def rescaled(cls, arrays: dict, r_n: float, r_s: float) -> dict:
        """Parameter arrays in units (scale_n, scale_s) rewritten in (r_n scale_n, r_s scale_s),
        the paper-unit P and Q unchanged (see `pq`): P's columns and Q's rows carry
        diag(1, …, 1, 1/s), P also 1/n."""

    @classmethod
    def from_arrays(cls, arrays: dict, d: int, scale_n: float = 1.0, scale_s: float = 1.0):
        """A layer from its parameter arrays (`fields`), the input dimension d (for the classes
        that store it) and its units."""
        return cls(**arrays, scale_n=scale_n, scale_s=scale_s)

    @classmethod
    def stacked(cls, arrays: dict, d: int, scale_n: float, scale_s: float):
        """Layers from their parameter arrays (leading axis: layers), built under vmap so that
        the constructor's shape checks are per layer."""
        return eqx.filter_vmap(lambda a: cls.from_arrays(a, d, scale_n, scale_s))(arrays)

    def arrays(self) -> dict:
        """The parameter arrays (`fields`) by name."""
        return {name: getattr(self, name) for name in self.fields}

    @classmethod
    def embed(cls, source: "AbstractLinearAttention", key: PRNGKeyArray, noise: float, dtype):
        """Parameter arrays of this kind for the same function as `source` (stacked layers of
        a kind in `embeds`, in the same units), the new degrees of freedom `noise`-scaled
        normals. A subclass that embeds other kinds extends this."""
        if source.kind != cls.kind:
            raise TypeError(f"a {cls.label} layer cannot embed a {source.label} one")
        return {n: a.astype(dtype) for n, a in source.arrays().items()}

    def kernel_operands(self) -> tuple[int, Float[Array, "L H D D"], Float[Array, "L H D D"]]:
        """(mode, p, q) of the CPU kernel for these (stacked) layers: mode 0 takes P_k, Q_k in
        paper units, which fits any variant."""
        p, q = eqx.filter_vmap(lambda layer: layer.pq())(self)
        return 0, p, q

    def pq(self) -> tuple[Float[Array, "heads D D"], Float[Array, "heads D D"]]:
        """P_k and Q_k in the paper's units (what the paper's Figure 4 shows)."""
        p, q = self.raw_pq()
        u = _unit_diag(p.shape[-1] - 1, self.scale_s, p.dtype)
        return p * u[None, None, :] / self.scale_n, u[None, :, None] * q

    def __call__(self, tokens: Float[Array, "m D"], n: int) -> Float[Array, "m D"]:
        t = self.operator(context_statistics(tokens, n))
        return tokens + tokens @ t.T


class FullAttention(AbstractLinearAttention, strict=True):
    """FULL: P_k, Q_k are unconstrained D×D matrices (2·D² parameters per head)."""

    kind: ClassVar[str] = "full"
    label: ClassVar[str] = "FULL"
    fields: ClassVar[tuple[str, ...]] = ("p", "q")
    embeds: ClassVar[tuple[str, ...]] = ("gdpp", "diag", "full")

    p: Float[Array, "heads D D"]
    q: Float[Array, "heads D D"]
    scale_n: float = eqx.field(static=True, default=1.0)
    scale_s: float = eqx.field(static=True, default=1.0)

    @property
    def d(self) -> int:
        return int(self.p.shape[-1] - 1)

    def raw_pq(self):
        return self.p, self.q

    @classmethod
    def init_arrays(cls, key, heads, d, scale, gd, dtype):
        kp, kq = jr.split(key)
        p = scale * jr.normal(kp, (heads, d + 1, d + 1), dtype)
        q = scale * jr.normal(kq, (heads, d + 1, d + 1), dtype)
        if gd is not None:
            p = p.at[0, d, d].add(-gd)
            q = q.at[0, :d, :d].add(jnp.eye(d, dtype=dtype))
        return {"p": p, "q": q}

    @classmethod
    def rescaled(cls, arrays, r_n, r_s):
        # p: (..., heads, D, D), the y column last; q: the y row last
        return {
            "p": (arrays["p"] * r_n).at[..., -1].multiply(r_s),
            "q": arrays["q"].at[..., -1, :].multiply(r_s),
        }

    @classmethod
    def embed(cls, source, key, noise, dtype):
        """A narrower kind's P, Q as full matrices, noise on all of P."""
        if source.kind == cls.kind:
            return super().embed(source, key, noise, dtype)
        p, q = eqx.filter_vmap(lambda layer: layer.raw_pq())(source)
        p, q = p.astype(dtype), q.astype(dtype)
        return {"p": p + noise * jr.normal(key, p.shape, dtype), "q": q}

    def operator(self, stats):
        p, q = self.pq()
        return jnp.einsum("kij,jl,klm->im", p, stats, q)


class AbstractDiagAttention(AbstractLinearAttention):
    """P_k = diag(p_x I, p_y), Q_k = diag(q_x I, q_y). The layer is then (SPEC §2)
    x_i ← x_i + w_xx Σ x_i + w_xy y_i α,  y_i ← y_i + w_yx <α, x_i> + w_yy λ y_i."""

    p: eqx.AbstractVar[Float[Array, "heads 2"]]
    dim: eqx.AbstractVar[int]

    @property
    def d(self) -> int:
        return self.dim

    @abc.abstractmethod
    def head_scalars(self) -> Float[Array, "4 heads"]:
        """(p_x, p_y, q_x, q_y) of every head, in the layer's own units."""

    @classmethod
    def from_arrays(cls, arrays, d, scale_n=1.0, scale_s=1.0):
        return cls(**arrays, dim=d, scale_n=scale_n, scale_s=scale_s)

    @classmethod
    def _init_p(cls, kp, heads, scale, gd, dtype):
        p = scale * jr.normal(kp, (heads, 2), dtype)
        return p if gd is None else p.at[0, 1].add(-gd)

    @classmethod
    def rescaled(cls, arrays, r_n, r_s):
        # p = (p_x, p_y) per head; the q fields are the subclasses'
        return {**arrays, "p": (arrays["p"] * r_n).at[..., 1].multiply(r_s)}

    def kernel_operands(self):
        """Mode 1: the matrix W with Tˡ = W ⊙ Sˡ (q unused), read off the layer's own
        operator, which is linear in S."""
        big_d = self.dim + 1
        ones = jnp.ones((big_d, big_d), self.p.dtype)
        w = eqx.filter_vmap(lambda layer: layer.operator(ones))(self)[:, None]
        return 1, w, jnp.zeros_like(w)

    def coefficients(self) -> Float[Array, "4"]:
        """(w_xx, w_xy, w_yx, w_yy) in paper units: sums over heads of p·q products."""
        px, py, qx, qy = self.head_scalars()
        n, s = self.scale_n, self.scale_s
        return jnp.stack(
            [
                jnp.sum(px * qx) / n,
                jnp.sum(px * qy) / (n * s),
                jnp.sum(py * qx) / (n * s),
                jnp.sum(py * qy) / (n * s * s),
            ]
        )

    def raw_pq(self):
        px, py, qx, qy = self.head_scalars()
        d = self.dim

        def diag(ax, ay):
            return jax.vmap(lambda a, b: jnp.diag(jnp.concatenate([jnp.full((d,), a), b[None]])))(
                ax, ay
            )

        return diag(px, py), diag(qx, qy)

    def operator(self, stats):
        wxx, wxy, wyx, wyy = self.coefficients()
        d = self.dim
        top = jnp.concatenate([wxx * stats[:d, :d], wxy * stats[:d, d:]], axis=1)
        bottom = jnp.concatenate([wyx * stats[d:, :d], wyy * stats[d:, d:]], axis=1)
        return jnp.concatenate([top, bottom], axis=0)


class DiagAttention(AbstractDiagAttention, strict=True):
    """DIAG: four scalars (p_x, p_y, q_x, q_y) per head."""

    kind: ClassVar[str] = "diag"
    label: ClassVar[str] = "DIAG"
    fields: ClassVar[tuple[str, ...]] = ("p", "q")
    embeds: ClassVar[tuple[str, ...]] = ("gdpp", "diag")

    p: Float[Array, "heads 2"]
    q: Float[Array, "heads 2"]
    dim: int = eqx.field(static=True)
    scale_n: float = eqx.field(static=True, default=1.0)
    scale_s: float = eqx.field(static=True, default=1.0)

    def head_scalars(self):
        return jnp.stack([self.p[:, 0], self.p[:, 1], self.q[:, 0], self.q[:, 1]])

    @classmethod
    def init_arrays(cls, key, heads, d, scale, gd, dtype):
        kp, kq = jr.split(key)
        p = cls._init_p(kp, heads, scale, gd, dtype)
        q = scale * jr.normal(kq, (heads, 2), dtype)
        return {"p": p, "q": q if gd is None else q.at[0, 0].add(1.0)}

    @classmethod
    def rescaled(cls, arrays, r_n, r_s):
        return {**super().rescaled(arrays, r_n, r_s), "q": arrays["q"].at[..., 1].multiply(r_s)}

    @classmethod
    def embed(cls, source, key, noise, dtype):
        """GD++'s q_y (zero there) becomes a free parameter."""
        if source.kind == cls.kind:
            return super().embed(source, key, noise, dtype)
        if source.kind != GDPPAttention.kind:
            raise TypeError(f"a {cls.label} layer cannot embed a {source.label} one")
        assert isinstance(source, GDPPAttention)  # the only class of its kind (strict: final)
        p, q_x = source.p.astype(dtype), source.q_x.astype(dtype)
        q_y = noise * jr.normal(key, q_x.shape, dtype)
        return {"p": p, "q": jnp.stack([q_x, q_y], axis=-1)}


class GDPPAttention(AbstractDiagAttention, strict=True):
    """GD++: DIAG with q_y = 0 in every head, so only w_xx and w_yx remain."""

    kind: ClassVar[str] = "gdpp"
    label: ClassVar[str] = "GD++"
    fields: ClassVar[tuple[str, ...]] = ("p", "q_x")
    embeds: ClassVar[tuple[str, ...]] = ("gdpp",)

    p: Float[Array, "heads 2"]
    q_x: Float[Array, " heads"]
    dim: int = eqx.field(static=True)
    scale_n: float = eqx.field(static=True, default=1.0)
    scale_s: float = eqx.field(static=True, default=1.0)

    def head_scalars(self):
        return jnp.stack([self.p[:, 0], self.p[:, 1], self.q_x, jnp.zeros_like(self.q_x)])

    @classmethod
    def init_arrays(cls, key, heads, d, scale, gd, dtype):
        kp, kq = jr.split(key)
        p = cls._init_p(kp, heads, scale, gd, dtype)
        q_x = scale * jr.normal(kq, (heads,), dtype)
        return {"p": p, "q_x": q_x if gd is None else q_x.at[0].add(1.0)}

    # rescaled: q_x carries no unit (the x rows of Q), so AbstractDiagAttention's applies


VARIANTS: dict[str, type[AbstractLinearAttention]] = {
    cls.kind: cls for cls in (GDPPAttention, DiagAttention, FullAttention)
}
"""Every layer variant by its `kind` (`model.kind`), narrowest first."""

_REGISTERED: dict[str, type[AbstractLinearAttention]] = {}


def register_layer(cls: type) -> type:
    """Make a layer class of one's own known by its `kind` wherever eqicl reads a kind: in a
    config (`model.kind`, config.json, so `eqicl.run` trains it and resumes its run
    directory), in a weights file (`load_weights` without `layer_class`) and in warm starts
    (`model.init_from`, by its `embeds`). Returns the class (usable as a decorator);
    registering it again is a no-op. A process that reads such a run directory or file
    registers the class first (import the module that defines it). ConfigError (one line)
    for a class that is not a concrete layer class, or a kind or label that another class
    has."""
    if not (isinstance(cls, type) and issubclass(cls, AbstractLinearAttention)):
        raise ConfigError(f"register_layer takes a layer class, got {cls!r}")
    missing = [a for a in ("kind", "label", "fields", "embeds") if not hasattr(cls, a)]
    if missing or getattr(cls, "__abstractmethods__", None):
        why = f"it names no {missing[0]!r}" if missing else "it is abstract"
        raise ConfigError(f"register_layer: {cls.__name__} is not a concrete layer class ({why})")
    known = layer_classes()
    if known.get(cls.kind, cls) is not cls:
        raise ConfigError(
            f"register_layer: the kind {cls.kind!r} is {known[cls.kind].__name__}'s, not "
            f"{cls.__name__}'s"
        )
    same_label = [k for k, c in known.items() if c.label == cls.label and c is not cls]
    if same_label:
        raise ConfigError(
            f"register_layer: the label {cls.label!r} is the {same_label[0]!r} kind's"
        )
    _REGISTERED[cls.kind] = cls
    return cls


def layer_classes() -> dict[str, type[AbstractLinearAttention]]:
    """Every kind eqicl knows, eqicl's own (`VARIANTS`) then the registered ones, in the order
    they were registered."""
    return {**VARIANTS, **_REGISTERED}


def layer_class(kind: str) -> type[AbstractLinearAttention]:
    """The layer class of `kind` (eqicl's own or registered); ConfigError if none."""
    cls = layer_classes().get(kind)
    if cls is None:
        raise ConfigError(
            f"unknown model kind {kind!r} (one of {', '.join(layer_classes())}; a layer class "
            "of one's own: eqicl.register_layer(cls))"
        )
    return cls


def init_layer(
    key: PRNGKeyArray,
    model: ModelConfig,
    d: int,
    scale_n: float,
    scale_s: float,
    gd_step: float,
    dtype=jnp.float32,
) -> AbstractLinearAttention:
    """One layer. `init="gd"` makes it (up to `init_scale` noise) the gradient step
    y_i ← y_i − gd_step <α, x_i> in paper units; `init="normal"` is pure N(0, init_scale²)."""
    cls = layer_class(model.kind)
    # The raw value that gives the paper-unit step `gd_step` in these units.
    gd = gd_step * scale_n * scale_s if model.init == "gd" else None
    arrays = cls.init_arrays(key, model.heads, d, model.init_scale, gd, dtype)
    return cls.from_arrays(arrays, d, scale_n, scale_s)


class UnknownLayer(ValueError):
    """A computation that reads a layer only through its operator (the statistics
    formulation, the CPU kernel, the Theorem 4.1 terms) asked of a layer class whose
    `__call__` is its own (`AbstractLinearAttention.statistics_exact` false). One line."""


def require_statistics(model: "LinearTransformer", what: str) -> None:
    """UnknownLayer unless `what` (a computation on the statistics) is exact for `model`."""
    cls = type(model.layers)
    if not cls.statistics_exact:
        raise UnknownLayer(
            f"{what} reads a layer only through its operator(), but {cls.__name__} overrides "
            "__call__; compute it on the tokens (train.formulation=tokens, eqicl.evaluate, "
            f"model(x, y, xq)), or set {cls.__name__}.statistics_exact = True if operator() "
            "is the whole layer"
        )


class LinearTransformer(eqx.Module, strict=True):
    """A stack of linear self-attention layers of one kind (SPEC §2).

    `layers` holds every layer's parameters stacked along a leading axis of length
    `num_layers` (so `layers.p` is `(L, heads, D, D)` for FULL); the forward pass scans over
    it. The prediction after layer l is ŷ = −(last coordinate of the query token).
    """

    layers: AbstractLinearAttention
    num_layers: int = eqx.field(static=True)

    @property
    def kind(self) -> str:
        """The layers' variant (a `model.kind`)."""
        return self.layers.kind

    @property
    def statistics_exact(self) -> bool:
        """Whether the statistics formulation computes this model (see
        `AbstractLinearAttention.statistics_exact`)."""
        return type(self.layers).statistics_exact

    def layer(self, index: int) -> AbstractLinearAttention:
        """Layer `index` (0-based) as a stand-alone module."""
        dynamic, static = eqx.partition(self.layers, eqx.is_array)
        return eqx.combine(jax.tree.map(lambda a: a[index], dynamic), static)

    def tokens(
        self, x: Float[Array, "n d"], y: Float[Array, " n"], xq: Float[Array, "m d"]
    ) -> Float[Array, "layers_plus_1 n_plus_m D"]:
        """Every token, context and queries, before the first and after every layer."""
        n = x.shape[0]
        ctx = jnp.concatenate([x, y[:, None]], axis=1)
        qry = jnp.concatenate([xq, jnp.zeros((xq.shape[0], 1), xq.dtype)], axis=1)
        e0 = jnp.concatenate([ctx, qry], axis=0)
        dynamic, static = eqx.partition(self.layers, eqx.is_array)

        def step(e, dyn):
            e = eqx.combine(dyn, static)(e, n)
            return e, e

        _, es = jax.lax.scan(step, e0, dynamic)
        return jnp.concatenate([e0[None], es], axis=0)

    def __call__(
        self, x: Float[Array, "n d"], y: Float[Array, " n"], xq: Float[Array, "m d"]
    ) -> Float[Array, "layers m"]:
        """Predictions ŷ for every query after every layer (row l: after layer l + 1)."""
        return -self.tokens(x, y, xq)[1:, x.shape[0] :, -1]

    def predict(
        self, x: Float[Array, "n d"], y: Float[Array, " n"], xq: Float[Array, " d"]
    ) -> Float[Array, ""]:
        """The model's prediction for one query after the last layer."""
        return self(x, y, xq[None])[-1, 0]

    def implicit_weights(
        self, x: Float[Array, "n d"], y: Float[Array, " n"]
    ) -> Float[Array, "layers d"]:
        """w^l of Theorem 4.1 after every layer: ŷ = <w^l, x_t> exactly, read off by querying
        the basis vectors (the query never enters the context sums, so ŷ is linear in x_t)."""
        d = x.shape[1]
        return self(x, y, jnp.eye(d, dtype=x.dtype))

    def pq(self) -> tuple[Float[Array, "layers heads D D"], Float[Array, "layers heads D D"]]:
        """Every layer's P_k, Q_k in paper units."""
        return eqx.filter_vmap(lambda layer: layer.pq())(self.layers)

    def coefficients(self) -> Float[Array, "layers 4"]:
        """(w_xx, w_xy, w_yx, w_yy) of every layer, paper units (DIAG and GD++ only)."""
        if not isinstance(self.layers, AbstractDiagAttention):
            raise TypeError("coefficients() needs a DIAG or GD++ model; use pq() for FULL")
        return eqx.filter_vmap(lambda layer: layer.coefficients())(self.layers)


def units(model: ModelConfig, task: TaskConfig) -> tuple[float, float]:
    """(scale_n, scale_s) for the model's parameter units."""
    if model.units == "paper":
        return 1.0, 1.0
    return float(task.n), float((task.d + task.mean_sigma2) ** 0.5)


def init_transformer(
    key: PRNGKeyArray, model: ModelConfig, task: TaskConfig, dtype=jnp.float32
) -> LinearTransformer:
    """A fresh transformer for `task`. With `init="gd"` every layer starts as the stable
    gradient step of size 1/(n s), s² = d + E[σ²] (SPEC §8). With `init_from`, the trained
    model in that file, embedded (see `warm_transformer`)."""
    if model.init_from:
        return warm_transformer(key, model, task, dtype)
    scale_n, scale_s = units(model, task)
    gd_step = _gd_step(task)
    keys = jr.split(key, model.layers)
    layers = eqx.filter_vmap(
        lambda k: init_layer(k, model, task.d, scale_n, scale_s, gd_step, dtype)
    )(keys)
    return LinearTransformer(layers=layers, num_layers=model.layers)


# --------------------------------------------------------------------------------------------
# Weights files and warm starts


class WeightsError(ConfigError):
    """A weights file that cannot be read, or cannot start the model asked for (a bad
    `model.init_from`)."""


def save_weights(model: LinearTransformer, path, **meta: float | str) -> None:
    """Write a (single, not ensemble) model's parameters and their units to `path` (.npz,
    no pickles), atomically (`eqicl._files.atomic_write`). `meta` (numbers or strings) is
    stored beside them."""
    import numpy as np

    from ._files import atomic_write

    layers = model.layers
    missing = [a for a in ("kind", "fields") if not hasattr(type(layers), a)]
    if missing:
        raise WeightsError(
            f"cannot save a {type(layers).__name__} model: its class defines no "
            f"{' and no '.join(missing)} (a layer class names its kind and its parameter fields)"
        )
    arrays = {name: np.asarray(a) for name, a in layers.arrays().items()}
    info = {
        "kind": layers.kind,
        "layers": model.num_layers,
        "heads": int(arrays[layers.fields[0]].shape[1]),
        "d": layers.d,
        "scale_n": layers.scale_n,
        "scale_s": layers.scale_s,
        **meta,
    }
    with atomic_write(path, binary=True) as f:
        # numpy's stub reads the ** as possibly `allow_pickle`; the keys are array names.
        np.savez(f, **arrays, **{f"meta.{k}": np.asarray(v) for k, v in info.items()})  # pyright: ignore[reportArgumentType]


def load_weights(
    path, layer_class: type[AbstractLinearAttention] | None = None
) -> tuple[LinearTransformer, dict]:
    """(model, meta) from a file written by `save_weights`; a layer class of one's own (not
    in `VARIANTS` and not registered) is passed as `layer_class` (its `kind` must be the
    file's)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read weights file {path}: {e}") from None
    meta = {k[5:]: data.pop(k).item() for k in list(data) if k.startswith("meta.")}
    try:
        cls = layer_classes().get(meta["kind"]) if layer_class is None else layer_class
        if cls is None:
            raise WeightsError(
                f"weights file {path} holds a {meta['kind']!r} model, not one of eqicl's "
                f"({', '.join(layer_classes())}); pass its layer class: "
                "load_weights(path, layer_class=...), or eqicl.register_layer it"
            )
        if cls.kind != meta["kind"]:
            raise WeightsError(
                f"weights file {path} holds a {meta['kind']!r} model, not a {cls.kind!r} one"
            )
        arrays = {name: jnp.asarray(data[name]) for name in cls.fields}
        layers = cls.stacked(arrays, int(meta["d"]), float(meta["scale_n"]), float(meta["scale_s"]))
        return LinearTransformer(layers=layers, num_layers=int(meta["layers"])), meta
    except KeyError as e:
        raise WeightsError(f"weights file {path} lacks {e}") from None


def _in_units(cls, arrays: dict, have: tuple[float, float], want: tuple[float, float]) -> dict:
    """Parameter arrays of the variant `cls` in units `have` = (scale_n, scale_s) rewritten in
    units `want` (see `AbstractLinearAttention.rescaled`)."""
    r_n, r_s = want[0] / have[0], want[1] / have[1]
    if r_n == 1.0 and r_s == 1.0:
        return arrays
    return cls.rescaled(arrays, r_n, r_s)


def _gd_step(task: TaskConfig) -> float:
    """The GD start's step size in paper units, 1/(n s) with s² = d + E[σ²] (SPEC §8)."""
    return 1.0 / (task.n * (task.d + task.mean_sigma2) ** 0.5)


def warm_transformer(
    key: PRNGKeyArray, model: ModelConfig, task: TaskConfig, dtype=jnp.float32
) -> LinearTransformer:
    """The model `model` asks for, started from the trained one in `model.init_from` (see
    ModelConfig): an exact embedding plus `init_scale` noise on the new parameters."""
    source, meta = load_weights(model.init_from)
    where = f"model.init_from={model.init_from}"
    cls, have = layer_class(model.kind), source.layers.kind
    scale_n, scale_s = units(model, task)
    if (int(meta["d"]), int(meta["heads"])) != (task.d, model.heads):
        raise WeightsError(
            f"{where} has d={meta['d']}, heads={meta['heads']}; the run asks for "
            f"d={task.d}, heads={model.heads}"
        )
    if have not in cls.embeds:
        raise WeightsError(
            f"{where} is a {have.upper()} model; it cannot start a {model.kind.upper()} one"
        )
    k_embed, k_new, k_id = jr.split(key, 3)
    # Rebuilt in this run's own units (the same function: a model trained for another noise
    # setting keeps its paper-unit P and Q), so the model has exactly the structure of a GD
    # start: checkpoints restore into either.
    arrays = cls.embed(source.layers, k_embed, model.init_scale, dtype)
    arrays = _in_units(
        cls, arrays, (float(meta["scale_n"]), float(meta["scale_s"])), (scale_n, scale_s)
    )
    if source.num_layers == model.layers:
        layers = cls.stacked(arrays, task.d, scale_n, scale_s)
        return LinearTransformer(layers=layers, num_layers=model.layers)
    if source.num_layers != model.layers - 1 or have != model.kind:
        raise WeightsError(
            f"{where} has {source.num_layers} {have.upper()} layers; it can start "
            f"{source.num_layers} layers of a wider kind or {source.num_layers + 1} of its own"
        )
    fresh = init_layer(
        k_new,
        dataclasses.replace(model, init="gd"),
        task.d,
        scale_n,
        scale_s,
        _gd_step(task),
        dtype,
    )
    # An identity layer in front: P = noise (so P S Q = 0 up to it), Q as in the GD start.
    first = {n: a[None] for n, a in fresh.arrays().items()}
    p_name = cls.fields[0]
    first[p_name] = model.init_scale * jr.normal(k_id, first[p_name].shape, dtype)
    arrays = {n: jnp.concatenate([first[n], arrays[n]], axis=0) for n in arrays}
    layers = cls.stacked(arrays, task.d, scale_n, scale_s)
    return LinearTransformer(layers=layers, num_layers=model.layers)
