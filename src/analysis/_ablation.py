"""Mechanism ablations (issue: which of DIAG's mechanisms buys what): DIAG with its four
coefficients (w_xx, w_xy, w_yx, w_yy) free per layer, and the same with a subset fixed at zero.

By Theorem 4.1 a DIAG layer updates the implicit weights and a momentum-like buffer u:
w_xy ≡ 0 keeps u at 0 (no momentum), w_yy ≡ 0 removes the adaptive rescaling of the labels,
and both at once leave GD++ (w_xx, w_yx: a preconditioned gradient step). The variants are
layer classes of their own, built on eqicl's public layer API (`eqicl.AbstractLinearAttention`),
so training, the statistics formulation, the CPU kernel, checkpoints, `eqicl.evaluate` and
`eqicl.save_weights` / `eqicl.load_weights(..., layer_class=...)` take them unchanged.

One head of DIAG has coefficients p·q (rank one: w_xx w_yy = w_xy w_yx); the free variant
drops that constraint (it is DIAG with two heads), so "DIAG-4" is the reference every
ablation is compared with, trained the same way.
"""

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

import eqicl

# The coefficients, in the order of `coefficients()` and of the layer's array.
NAMES = ("xx", "xy", "yx", "yy")


def _units(n: float, s: float, dtype) -> Float[Array, "4"]:
    """Own units → paper units divide the coefficients by these (as eqicl's DIAG does)."""
    return jnp.asarray([n, n * s, n * s, n * s * s], dtype)


class AbstractCoefficients(eqicl.AbstractDiagAttention):
    """x_i ← x_i + w_xx Σ x_i + w_xy y_i α,  y_i ← y_i + w_yx <α, x_i> + w_yy λ y_i, the four
    coefficients free per layer except those named in `zero`, which are 0 whatever the array
    holds (so training never moves them: their gradient is 0). As a DIAG layer it has two
    heads, P = diag(I, 0), Q = diag(c_xx I, c_xy) and P = diag(0, 1), Q = diag(c_yx I, c_yy)
    in its own units, so eqicl's DIAG code (coefficients, operator, P and Q, the kernel)
    reads it as it is."""

    zero: ClassVar[tuple[str, ...]]
    fields: ClassVar[tuple[str, ...]] = ("p",)

    # (c_xx, c_xy, c_yx, c_yy) in the layer's own units, one row; zero p is the identity
    # layer, as eqicl's warm starts take fields[0].
    p: eqx.AbstractVar[Float[Array, "1 4"]]

    @classmethod
    def mask(cls, dtype=jnp.float64) -> Float[Array, "4"]:
        return jnp.asarray([0.0 if name in cls.zero else 1.0 for name in NAMES], dtype)

    def head_scalars(self) -> Float[Array, "4 2"]:
        c = self.p[0] * self.mask(self.p.dtype)
        one, nil = jnp.ones((), c.dtype), jnp.zeros((), c.dtype)
        return jnp.stack(
            [
                jnp.stack([one, nil]),  # p_x of the two heads
                jnp.stack([nil, one]),  # p_y
                jnp.stack([c[0], c[2]]),  # q_x
                jnp.stack([c[1], c[3]]),  # q_y
            ]
        )

    @classmethod
    def init_arrays(cls, key, heads, d, scale, gd, dtype):
        if heads != 1:
            raise eqicl.ConfigError(f"the {cls.label} layer has one row, got model.heads={heads}")
        p = scale * jr.normal(key, (1, 4), dtype)
        if gd is not None:  # y_i ← y_i − gd <α, x_i>: w_yx, in own units
            p = p.at[0, 2].add(-gd)
        return {"p": p * cls.mask(dtype)[None, :]}

    @classmethod
    def rescaled(cls, arrays, r_n, r_s):
        factor = jnp.asarray([r_n, r_n * r_s, r_n * r_s, r_n * r_s * r_s], arrays["p"].dtype)
        return {"p": arrays["p"] * jnp.broadcast_to(factor, arrays["p"].shape)}

    @classmethod
    def embed(cls, source, key, noise, dtype):
        """A GD++, DIAG or coefficient layer (stacked, the same units) whose coefficients
        this class holds exactly (the `embeds` kinds); the free coefficients the source has
        at zero get `noise`."""
        if source.kind not in cls.embeds or not isinstance(source, eqicl.AbstractDiagAttention):
            raise TypeError(f"a {cls.label} layer cannot embed a {source.label} one")
        own = _own_coefficients(source).astype(dtype)
        fresh = noise * jr.normal(key, own.shape, dtype) * (own == 0).astype(dtype)
        return {"p": ((own + fresh) * cls.mask(dtype)[None, :])[:, None, :]}


def _own_coefficients(layers: eqicl.AbstractDiagAttention) -> Float[Array, "layers 4"]:
    """Stacked DIAG-like layers' (w_xx, w_xy, w_yx, w_yy) in their own units."""
    coeffs = eqx.filter_vmap(lambda layer: layer.coefficients())(layers)
    return coeffs * _units(layers.scale_n, layers.scale_s, coeffs.dtype)[None, :]


class FreeCoefficients(AbstractCoefficients, strict=True):
    """DIAG-4: all four coefficients free per layer (DIAG with two heads)."""

    kind: ClassVar[str] = "diag4"
    label: ClassVar[str] = "DIAG-4"
    zero: ClassVar[tuple[str, ...]] = ()
    embeds: ClassVar[tuple[str, ...]] = (
        "gdpp",
        "diag",
        "diag4",
        "diag4-no-momentum",
        "diag4-no-rescaling",
        "diag4-neither",
    )

    p: Float[Array, "1 4"]
    dim: int = eqx.field(static=True)
    scale_n: float = eqx.field(static=True, default=1.0)
    scale_s: float = eqx.field(static=True, default=1.0)


class NoMomentum(AbstractCoefficients, strict=True):
    """DIAG-4 with w_xy ≡ 0: by Theorem 4.1 the momentum buffer u stays 0."""

    kind: ClassVar[str] = "diag4-no-momentum"
    label: ClassVar[str] = "DIAG-4, w_xy ≡ 0"
    zero: ClassVar[tuple[str, ...]] = ("xy",)
    embeds: ClassVar[tuple[str, ...]] = ("gdpp", "diag4-neither", "diag4-no-momentum")

    p: Float[Array, "1 4"]
    dim: int = eqx.field(static=True)
    scale_n: float = eqx.field(static=True, default=1.0)
    scale_s: float = eqx.field(static=True, default=1.0)


class NoRescaling(AbstractCoefficients, strict=True):
    """DIAG-4 with w_yy ≡ 0: no adaptive rescaling of the labels."""

    kind: ClassVar[str] = "diag4-no-rescaling"
    label: ClassVar[str] = "DIAG-4, w_yy ≡ 0"
    zero: ClassVar[tuple[str, ...]] = ("yy",)
    embeds: ClassVar[tuple[str, ...]] = ("gdpp", "diag4-neither", "diag4-no-rescaling")

    p: Float[Array, "1 4"]
    dim: int = eqx.field(static=True)
    scale_n: float = eqx.field(static=True, default=1.0)
    scale_s: float = eqx.field(static=True, default=1.0)


class Neither(AbstractCoefficients, strict=True):
    """DIAG-4 with w_xy ≡ w_yy ≡ 0: the function class of GD++."""

    kind: ClassVar[str] = "diag4-neither"
    label: ClassVar[str] = "DIAG-4, w_xy ≡ w_yy ≡ 0"
    zero: ClassVar[tuple[str, ...]] = ("xy", "yy")
    embeds: ClassVar[tuple[str, ...]] = ("gdpp", "diag4-neither")

    p: Float[Array, "1 4"]
    dim: int = eqx.field(static=True)
    scale_n: float = eqx.field(static=True, default=1.0)
    scale_s: float = eqx.field(static=True, default=1.0)


ABLATIONS: dict[str, type[AbstractCoefficients]] = {
    cls.kind: cls for cls in (FreeCoefficients, NoMomentum, NoRescaling, Neither)
}
"""The variants by kind: the free one first, then each mechanism removed, then both."""

for _cls in ABLATIONS.values():  # model.kind, weights files and warm starts know them
    eqicl.register_layer(_cls)


def _lineup():
    from eqicl.sweep import Lineup, register_lineup

    kinds = tuple(reversed(ABLATIONS))  # narrowest first: both removed, ..., the free one
    return register_lineup(Lineup("ablation", kinds, {k: "diag" for k in kinds}))


LINEUP = _lineup()
"""The variants as the sweep's cells (`eqicl.sweep.run_recipe`): each trained with the Table 1
recipe as a DIAG cell (its rate, steps, stages and seeds), starting from the narrower variants
it embeds (both removed → one removed → the free one), and shown beside the paper's DIAG."""


def as_variant(
    model: eqicl.LinearTransformer, cls: type[AbstractCoefficients]
) -> eqicl.LinearTransformer:
    """`model` (GD++, DIAG or a coefficient variant) as a model of `cls` with the same
    coefficients, those `cls` fixes at zero removed: exact when `cls` embeds the kind, the
    test-time ablation otherwise (e.g. a trained DIAG with its w_xy set to 0)."""
    layers = model.layers
    if not isinstance(layers, eqicl.AbstractDiagAttention):
        raise TypeError(f"a {layers.label} model has no DIAG coefficients to ablate")
    own = _own_coefficients(layers)
    arrays = {"p": (own * cls.mask(own.dtype)[None, :])[:, None, :]}
    new = cls.stacked(arrays, layers.d, layers.scale_n, layers.scale_s)
    return eqicl.LinearTransformer(layers=new, num_layers=model.num_layers)


def init_variant(
    key: PRNGKeyArray, cls: type[AbstractCoefficients], config: eqicl.Config
) -> eqicl.LinearTransformer:
    """A fresh model of `cls` for `config` (its depth, units and GD start): eqicl's DIAG
    initialisation of the config rewritten as `cls`, its fixed coefficients at zero."""
    diag = eqicl.init_transformer(key, config.model, config.task, jnp.dtype(config.train.dtype))
    return as_variant(diag, cls)


def grow(
    model: eqicl.LinearTransformer, key: PRNGKeyArray, noise: float
) -> eqicl.LinearTransformer:
    """`model` with one more layer in front, the identity up to `noise` on its free
    coefficients (as eqicl's warm start from one layer fewer)."""
    layers = model.layers
    if not isinstance(layers, AbstractCoefficients):
        raise TypeError(f"grow takes a coefficient variant, got {layers.label}")
    cls = type(layers)
    first = noise * jr.normal(key, (1, 1, 4), layers.p.dtype) * cls.mask(layers.p.dtype)[None, None]
    arrays = {"p": jnp.concatenate([first, layers.p], axis=0)}
    new = cls.stacked(arrays, layers.d, layers.scale_n, layers.scale_s)
    return eqicl.LinearTransformer(layers=new, num_layers=model.num_layers + 1)


# --------------------------------------------------------------------------------------------
# The study: test-time removal from the trained Table 1 DIAG models, and the variants trained.

# The removals at test time, as the variant class each one becomes (DIAG itself: the free one).
REMOVALS: dict[str, type[AbstractCoefficients]] = {
    "DIAG": FreeCoefficients,
    "w_xy=0": NoMomentum,
    "w_yy=0": NoRescaling,
    "both=0": Neither,
}
# A test seed of its own (the table's are 2027 and 2028; training and selection use others).
SEED = 2029
FIELDS = ("study", "model", "layers", "noise", "variant", "paper", "plain", "plain_se")
FIELDS += ("plain_max", "plain_top", "tail", "tail_se", "tail_max", "tail_top", "sequences")
FIELDS += ("weights",)


def _row(study, model, cell, variant, paper, est, sequences, weights) -> dict:
    from eqicl._score import estimate_columns

    return {
        "study": study,
        "model": model,
        "layers": cell.layers,
        "noise": cell.column,
        "variant": variant,
        "paper": "" if paper is None else f"{paper:.6g}",
        **estimate_columns("plain", est["plain"]),
        **estimate_columns("tail", est["tail"]),
        "sequences": sequences,
        "weights": weights,
    }


def test_time(paper_dir, cells, sequences: int, seed: int = SEED, tick=None) -> list[dict]:
    """Every trained DIAG cell of `cells` (its weights in `paper_dir`) with each mechanism
    removed (`REMOVALS`), and the same cell's trained GD++ beside it, scored together on
    `sequences` plain and as many tail-aware sequences of the test draw of `seed` (one draw
    per noise setting, `eqicl.score_models`). One row per (cell, variant)."""
    from eqicl.sweep import Cell, weights_path

    rows = []
    table = eqicl.paper_table()
    for cell in cells:
        path = weights_path(paper_dir, cell)
        model = eqicl.load_weights(path)[0]
        models = {name: as_variant(model, cls) for name, cls in REMOVALS.items()}
        gdpp = weights_path(paper_dir, Cell("gdpp", cell.layers, cell.column))
        if gdpp.is_file():
            models["GD++ trained"] = eqicl.load_weights(gdpp)[0]
        est = eqicl.score_models(models, cell.column, seed, sequences, progress=tick)
        paper = table.get((cell.row, cell.layers, cell.column))
        for name in models:
            src = str(gdpp if name == "GD++ trained" else path)
            rows.append(_row("test-time", "DIAG", cell, name, paper, est[name], sequences, src))
    return rows


def weights_file(root, cls: type[AbstractCoefficients], layers: int, column: str):
    from eqicl._sweep import column_tag

    return root / "weights" / f"{cls.kind}-L{layers}-{column_tag(column)}.npz"


def train_variant(
    cls: type[AbstractCoefficients],
    layers: int,
    column: str,
    root,
    start: eqicl.LinearTransformer | None,
    steps: int | None = None,
    extra=(),
    echo=print,
) -> eqicl.LinearTransformer:
    """Train `cls` at depth `layers` on noise setting `column` as the Table 1 recipe trains a
    DIAG cell of the same depth and setting (`eqicl._sweep.cell_config`: its steps, rate,
    schedule and units; one seed), from the GD start (`start` None) or from `start` (the
    same variant one layer shallower) with an identity layer in front; into
    `root/runs/<kind>-L<layers>-<tag>` (checkpoints: resumable) and its weights file. A cell
    whose weights file exists is read back, not trained."""
    from eqicl._sweep import Cell, cell_config

    path = weights_file(root, cls, layers, column)
    if path.is_file():
        return eqicl.load_weights(path, layer_class=cls)[0]
    config = cell_config(Cell("diag", layers, column), steps, 1, extra)
    if start is None:

        def init(key):
            return init_variant(key, cls, config)
    else:

        def init(key):
            return grow(start, key, config.model.init_scale)

    trainer = eqicl.Trainer(config, init=init)
    run_dir = root / "runs" / path.stem
    eqicl.run(config, run_dir, progress=False, echo=lambda _: None, evaluate=False, trainer=trainer)
    state = eqicl.restore_checkpoint(run_dir, config, like=trainer.abstract())
    if state is None:
        raise RuntimeError(f"{run_dir} holds no checkpoint after training")
    model = eqicl.ensemble_member(state.model, 0)
    eqicl.save_weights(
        model, path, steps=float(config.train.steps), start="gd" if start is None else "L-1"
    )
    echo(f"trained {path.stem} ({config.train.steps} steps)")
    return model


def trained(
    root,
    columns,
    depths,
    variants,
    sequences: int,
    seed: int = SEED,
    steps=None,
    extra=(),
    echo=print,
    tick=None,
) -> list[dict]:
    """Each variant of `variants` trained (`train_variant`) at every depth of `depths`
    (ascending, each from the one before; the first from the GD start) on every noise
    setting of `columns`, then all of a setting scored together as in `test_time`."""
    rows = []
    for column in columns:
        models = {}
        for cls in variants:
            prev = None
            for layers in sorted(depths):
                prev = train_variant(cls, layers, column, root, prev, steps, extra, echo)
                models[(cls, layers)] = prev
        entries = [
            (cls, layers, m, weights_file(root, cls, layers, column))
            for (cls, layers), m in models.items()
        ]
        rows += _scored("trained", column, entries, sequences, seed, tick)
    return rows


def _scored(study: str, column: str, entries, sequences: int, seed: int, tick) -> list[dict]:
    """Rows of the variants `entries` ((class, layers, model, weights file) of one noise
    setting), all scored together on one test draw of `seed` (`eqicl.score_models`), each
    beside the paper's DIAG value of its depth."""
    from eqicl.sweep import Cell

    table = eqicl.paper_table()
    names = {f"{cls.kind}-L{layers}": (cls, layers, m, src) for cls, layers, m, src in entries}
    est = eqicl.score_models(
        {name: e[2] for name, e in names.items()}, column, seed, sequences, progress=tick
    )
    rows = []
    for name, (cls, layers, _, src) in names.items():
        cell = Cell("diag", layers, column)
        paper = table.get((cell.row, layers, column))
        rows.append(_row(study, cls.label, cell, cls.kind, paper, est[name], sequences, str(src)))
    return rows


def recipe_rows(sweep_dir, columns, depths, sequences: int, seed: int = SEED, tick=None):
    """The variants the Table 1 recipe trained into the sweep directory `sweep_dir` (`LINEUP`'s
    cells, `eqicl.sweep.run_recipe`), every recorded cell of `columns` × `depths`, all of a
    setting scored together on `sequences` plain and as many tail-aware sequences of the
    test draw of `seed`, as `trained` scores its own. Cells without weights are left out."""
    from eqicl.sweep import Cell, weights_path

    rows = []
    for column in columns:
        paths = [
            (ABLATIONS[kind], layers, weights_path(sweep_dir, Cell(kind, layers, column)))
            for kind in LINEUP.kinds
            for layers in sorted(depths)
        ]
        entries = [(c, n, eqicl.load_weights(p)[0], p) for c, n, p in paths if p.is_file()]
        if entries:
            rows += _scored("recipe", column, entries, sequences, seed, tick)
    return rows
