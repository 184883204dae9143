"""The Table 1 sweep: {GD++, DIAG, FULL} × layers 1–7 × the paper's 10 noise settings.

The recipe (`RECIPE`) is a sequence of stages; each stage makes one candidate per cell it
covers (an Adam run in an ordinary run directory under `run_root/<stage>/<cell>`, so it
resumes like any run, or an L-BFGS polish) and records it in `paper_dir/candidates/<stage>/`:
`table1.csv` (one row per cell), `cells/<cell>.json` (loss after every layer, the
per-variance profile and the validation loss, enough to redraw the figures without
checkpoints) and `weights/<cell>.npz`. The table in `paper_dir` is every cell's best candidate
by validation loss (`assemble`); the baselines are scored once per noise setting into
`baselines.csv` + `baselines/<column>.json`. Recorded candidates are skipped unless forced,
so a sweep can run in parts, on several machines, and be interrupted at any point; a cell
whose inputs are not recorded yet waits (`Recipe.missing_inputs`).
"""

import contextlib
import csv
import dataclasses
import fcntl
import io
import json
import math
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from ._config import Config, ConfigError, TaskConfig, TrainConfig, override, preset
from ._evaluate import (
    SOUND,
    TAIL,
    UNSOUND,
    SequenceCache,
    evaluate_baselines,
    rank_key,
    selection_keys,
    verdict,
)
from ._files import write_csv_atomic, write_json_atomic
from ._limits import machine_line
from ._model import layer_class
from ._paper import BASELINE_ROWS, MODEL_ROWS, paper_table
from ._score import TEST_FIELDS, TEST_SEED, TEST_SEQUENCES, score_table

MODELS = ("gdpp", "diag", "full")
LAYERS = tuple(range(1, 8))
COLUMNS = ("0", "1", "2", "3", "4", "5", "6", "7", "{1;3}", "{1;3;5}")
# exact_max / exact_top: the plain test draw's largest per-sequence loss and the share of its
# mean carried by the top 0.1 % of sequences; tail*: the tail-aware estimate (SPEC §9).
TAIL_FIELDS = (
    "exact_max",
    "exact_top",
    "tail",
    "tail_se",
    "tail_max",
    "tail_top",
    "tail_sequences",
)
TABLE_FIELDS = (
    "method",
    "layers",
    "noise",
    "adjusted",
    "adjusted_se",
    "exact",
    "exact_se",
    "paper",
    "steps",
    "seeds",
    "lr",
    "best_seed",
    "init",
    "train_seconds",
    "eval_seconds",
    "status",
    "pass",
    *TAIL_FIELDS,
    *TEST_FIELDS,
)
# Columns added after results were first recorded: a file without them reads them as "".
LATER_FIELDS = ("init", "pass", *TAIL_FIELDS, *TEST_FIELDS)
BASELINE_FIELDS = (
    "method",
    "noise",
    "adjusted",
    "adjusted_se",
    "exact",
    "exact_se",
    "paper",
    "params",
)

# The recipe (SPEC §8, measurements in runs/paper/RESULTS.md): scaled units, every layer
# starting as a stable GD step, the exact objective with per-sequence loss capped at 20,
# Adam with warm-up and cosine decay, global-norm clip 1.
LEARNING_RATES = {"gdpp": 3e-2, "diag": 3e-2, "full": 1e-2}


def recipe_steps(model: str, layers: int) -> int:
    """Training steps of a cell: 1000 × (layers + 1), twice that for FULL from 5 layers,
    which keeps improving for longer (the measurements behind the rule are in
    runs/paper/RESULTS.md)."""
    model = trained_like(model)
    return 1000 * (layers + 1) * (2 if model == "full" and layers >= 5 else 1)


# Figure 5 (the paper's shaded bands) is drawn over 5 training seeds at sigma ~ U(0, 5): those
# cells train 5 seeds and keep the best (by validation loss), the others one.
FIGURE5_COLUMN = "5"
FIGURE5_SEEDS = 5


def recipe_seeds(column: str) -> int:
    """Adam seeds of a cell of the noise setting `column`: 5 for Figure 5's, else 1."""
    return FIGURE5_SEEDS if column == FIGURE5_COLUMN else 1


class SweepError(ValueError):
    """A sweep that cannot run as asked, or a results file that cannot be trusted."""


@dataclasses.dataclass(frozen=True)
class Lineup:
    """Model kinds a sweep trains together, narrowest first. A kind's warm starts and its
    polish take the narrower kinds of its lineup whose models its layer class embeds
    (`layer_class(kind).embeds`), and it trains with the recipe's settings (learning rate,
    steps) of the Table 1 model `like[kind]`, whose paper value its rows carry. Table 1's is
    `TABLE1`; a study of layer classes of one's own (`eqicl.register_layer`) registers its
    own with `register_lineup`, and its cells are then cells like any other."""

    name: str
    kinds: tuple[str, ...]
    like: Mapping[str, str]


TABLE1 = Lineup("table1", MODELS, MappingProxyType({k: k for k in MODELS}))
_LINEUPS: dict[str, Lineup] = {TABLE1.name: TABLE1}


def register_lineup(lineup: Lineup) -> Lineup:
    """Make `lineup`'s kinds sweep cells (`parse_cells(..., lineup=...)`, `run_recipe`);
    registering the same lineup again is a no-op. SweepError (one line) for a kind that is
    not a known layer class, a `like` that is not a Table 1 model, or a kind that another
    lineup has."""
    if set(lineup.like) != set(lineup.kinds) or len(set(lineup.kinds)) != len(lineup.kinds):
        raise SweepError(f"lineup {lineup.name}: `like` must name each of its kinds once")
    for kind in lineup.kinds:
        try:
            layer_class(kind)
        except ConfigError as e:
            raise SweepError(f"lineup {lineup.name}: {e}") from None
        if lineup.like[kind] not in MODELS:
            raise SweepError(
                f"lineup {lineup.name}: {kind} is trained like {lineup.like[kind]!r}, not one "
                f"of {', '.join(MODELS)}"
            )
        other = next((lu for lu in _LINEUPS.values() if kind in lu.kinds), lineup)
        if other.name != lineup.name:
            raise SweepError(f"lineup {lineup.name}: the kind {kind} is lineup {other.name}'s")
    if _LINEUPS.get(lineup.name, lineup) != lineup:
        raise SweepError(f"a lineup named {lineup.name} is registered with other kinds")
    _LINEUPS[lineup.name] = lineup
    return lineup


def lineup_of(kind: str) -> Lineup:
    lineup = next((lu for lu in _LINEUPS.values() if kind in lu.kinds), None)
    if lineup is None:
        known = [k for lu in _LINEUPS.values() for k in lu.kinds]
        raise SweepError(f"unknown model {kind!r} (one of {', '.join(known)})")
    return lineup


def trained_like(kind: str) -> str:
    """The Table 1 model whose recipe settings `kind` trains with (itself for Table 1's)."""
    return lineup_of(kind).like[kind]


def narrower_kinds(kind: str) -> list[str]:
    """The kinds before `kind` in its lineup whose models it embeds exactly, narrowest first."""
    kinds = lineup_of(kind).kinds
    embeds = layer_class(kind).embeds
    return [k for k in kinds[: kinds.index(kind)] if k in embeds]


def _kind_index(kind: str) -> tuple[int, int]:
    names = list(_LINEUPS)
    lineup = lineup_of(kind)
    return names.index(lineup.name), lineup.kinds.index(kind)


@dataclasses.dataclass(frozen=True, order=True)
class Cell:
    model: str
    layers: int
    column: str

    @property
    def name(self) -> str:
        return f"{self.model}-L{self.layers}-{column_tag(self.column)}"

    @property
    def row(self) -> str:
        """The method's name in tables ("GD++"; a registered layer class: its label)."""
        return layer_class(self.model).label


def column_tag(column: str) -> str:
    """A file-name-safe tag of a Table 1 column: "3" -> "u3", "{1;3}" -> "c1_3"."""
    if column.startswith("{"):
        return "c" + column.strip("{}").replace(";", "_")
    return f"u{column}"


def task_for(column: str) -> TaskConfig:
    """The task of a Table 1 column: "3" is σ ~ U(0, 3), "{1;3}" is σ uniform over {1, 3}."""
    if column not in COLUMNS:
        raise SweepError(f"unknown noise setting {column!r} (one of {', '.join(COLUMNS)})")
    if column.startswith("{"):
        levels = tuple(float(v) for v in column.strip("{}").split(";"))
        return TaskConfig(noise="categorical", sigma_set=levels)
    return TaskConfig(noise="uniform", sigma_max=float(column))


def cell_config(
    cell: Cell,
    steps: int | None,
    seeds: int | None,
    extra: Sequence[str] = (),
    init_from: str = "",
    settings: Mapping[str, Any] = MappingProxyType({}),
) -> Config:
    """The config the sweep trains for one cell: the default preset with the cell's model,
    depth and noise, the recipe's learning rate, steps and seeds (`steps`, `seeds` override
    them; see `recipe_steps`, `recipe_seeds`), the warm
    start `init_from` (see `warm_start`), a stage's training `settings` (TrainConfig fields),
    then the user's `--set` overrides."""
    base = preset("default")
    config = dataclasses.replace(
        base,
        task=task_for(cell.column),
        model=dataclasses.replace(
            base.model, kind=cell.model, layers=cell.layers, init_from=init_from
        ),
        train=dataclasses.replace(
            base.train,
            lr=LEARNING_RATES[trained_like(cell.model)],
            seeds=seeds if seeds is not None else recipe_seeds(cell.column),
            steps=steps if steps is not None else recipe_steps(cell.model, cell.layers),
            **settings,
        ),
    )
    return override(config, extra) if extra else config


def weights_path(paper_dir: pathlib.Path, cell: Cell) -> pathlib.Path:
    return paper_dir / "weights" / f"{cell.name}.npz"


def start_candidates(cell: Cell) -> list[Cell]:
    """The trained cells that embed exactly into `cell` (eqicl.warm_transformer): one layer
    fewer of the same kind (plus an identity layer), and the same depth of a narrower kind."""
    out = [Cell(cell.model, cell.layers - 1, cell.column)] if cell.layers > 1 else []
    narrower = narrower_kinds(cell.model)
    return out + [Cell(m, cell.layers, cell.column) for m in reversed(narrower)]


# The noise settings next to each one, for starts across noise settings: sigma_max +- 1; a set
# of levels is next to sigma_max = its top level and to the other set.
NEIGHBOURS = {
    **{str(k): [str(j) for j in (k - 1, k + 1) if 0 <= j <= 7] for k in range(8)},
    "{1;3}": ["3", "{1;3;5}"],
    "{1;3;5}": ["5", "{1;3}"],
}


def neighbour_candidates(cell: Cell) -> list[Cell]:
    """The same model and depth trained for the noise settings next to the cell's."""
    return [Cell(cell.model, cell.layers, c) for c in NEIGHBOURS[cell.column]]


def start_model(path: pathlib.Path, config: Config, dtype=None):
    """The model in the weights file `path` rewritten as `config`'s model, the same function
    (`warm_transformer` without noise), in `dtype` (default float32, as a run starts);
    WeightsError if it cannot start that model."""
    import jax.numpy as jnp
    import jax.random as jr

    from ._model import warm_transformer

    model = dataclasses.replace(config.model, init_from=str(path), init_scale=0.0)
    return warm_transformer(jr.key(0), model, config.task, dtype or jnp.float32)


def _stack(models):
    """Models of one structure as one ensemble (parameters stacked on a leading axis)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    static = eqx.partition(models[0], eqx.is_array)[1]
    arrays = [eqx.filter(m, eqx.is_array) for m in models]
    return eqx.combine(jax.tree.map(lambda *a: jnp.stack(a), *arrays), static)


def start_losses(paths: Sequence[pathlib.Path], config: Config) -> list[float]:
    """The validation losses (the held-out selection sequences of `config`'s task) of the
    models in the weights files `paths`, each rewritten as `config`'s model start without
    noise, scored together on one draw of those sequences; inf for a file that cannot start
    it or a loss that is not finite. The sequences are drawn in the evaluation dtype, so this
    needs x64 on (as eqicl's commands set it, and as the recorded losses were computed): in
    float32 they would be other sequences, not comparable."""
    return [loss for _, loss in start_keys(paths, config)]


def start_keys(paths: Sequence[pathlib.Path], config: Config) -> list[tuple[bool, float]]:
    """`start_losses` with each start's soundness, as every choice ranks candidates
    (`eqicl._evaluate.selection_keys`); (True, inf) for a file that cannot start the model."""
    import jax

    from ._evaluate import select_estimates
    from ._model import WeightsError

    if not jax.config.read("jax_enable_x64"):
        raise SweepError(
            "scoring a start needs jax_enable_x64 (eqicl._cli.setup_jax turns it on): the "
            "recorded validation losses were computed on float64 sequences"
        )
    out, models, index = [(True, math.inf)] * len(paths), [], []
    for i, path in enumerate(paths):
        try:
            models.append(start_model(path, config))
        except WeightsError:
            continue
        index.append(i)
    if models:  # one ensemble: every start in the run's units, so the same static structure
        keys = selection_keys(select_estimates(_stack(models), config))
        for i, key in zip(index, keys, strict=True):
            out[i] = key
    return out


def warm_start(
    paper_dir: pathlib.Path,
    cell: Cell,
    config: Config | None = None,
    also: Sequence[pathlib.Path] = (),
    across_noise: bool = False,
) -> pathlib.Path | None:
    """The recipe's start for `cell`: the weights file of the recorded candidate
    (`start_candidates`) with the lowest `validation_loss` (held-out sequences, never the test
    ones), looked for in `paper_dir` and in the other passes' directories `also`; None (the GD
    start) when none is recorded. A deeper or wider model started there is at least as good as
    that candidate before its first step. With the cell's `config`, candidates that cannot
    start it (e.g. recorded with other `--set` overrides: another head count) are passed
    over. On equal losses the earlier candidate wins, and for one candidate `paper_dir`, then
    `also` in order.

    With `across_noise` (and `config`), the same model and depth recorded in `also` for the
    neighbouring noise settings (`neighbour_candidates`) compete too, after those, with their
    loss on this cell's validation sequences (`start_losses`): a cell can take a basin its
    neighbour found."""
    import equinox as eqx
    import jax.random as jr

    from ._model import WeightsError, load_weights, warm_transformer

    def can_start(path):
        try:
            if config is None:
                load_weights(path)
            else:
                model = dataclasses.replace(config.model, init_from=str(path))
                eqx.filter_eval_shape(warm_transformer, jr.key(0), model, config.task)
        except WeightsError:
            return False
        return True

    scored = [
        (path, validation_key(where, cand))
        for cand in start_candidates(cell)
        for where in (paper_dir, *also)
        if (path := weights_path(where, cand)).is_file() and can_start(path)
    ]
    if across_noise and config is not None:
        paths = [weights_path(where, cand) for cand in neighbour_candidates(cell) for where in also]
        paths = [p for p in paths if p.is_file()]
        scored += zip(paths, start_keys(paths, config), strict=True)
    best, key = min(scored, key=lambda s: s[1], default=(None, (True, math.inf)))
    return best if math.isfinite(key[1]) else None


def start_name(path: pathlib.Path | str) -> str:
    """How a start is recorded (`init` column): `<pass>/<cell>` for a weights file of a paper
    directory (e.g. `cold/diag-L3-u5`), else the file's stem."""
    path = pathlib.Path(path)
    if path.parent.name == "weights" and path.parent.parent.name:
        return f"{path.parent.parent.name}/{path.stem}"
    return path.stem


def parse_cells(models: str, layers: str, noise: str, lineup: Lineup = TABLE1) -> list[Cell]:
    """Cells from comma-separated lists; layers also as a range "1-7"; "all" for everything;
    the models of `lineup` (default Table 1's)."""

    def items(text, allowed, what):
        if text == "all":
            return list(allowed)
        out = []
        for part in (p.strip() for p in text.split(",") if p.strip()):
            if what == "layers" and "-" in part:
                lo, hi = part.split("-", 1)
                try:
                    out += [str(i) for i in range(int(lo), int(hi) + 1)]
                except ValueError:
                    raise SweepError(f"bad layer range {part!r}") from None
            else:
                out.append(part)
        bad = [p for p in out if p not in allowed]
        if bad:
            raise SweepError(f"unknown {what} {bad[0]!r} (one of {', '.join(allowed)})")
        return out

    ms = items(models.lower(), lineup.kinds, "model")
    ls = [int(v) for v in items(layers, [str(v) for v in LAYERS], "layers")]
    cs = items(noise, COLUMNS, "noise setting")
    return sorted({Cell(m, layer, c) for m in ms for layer in ls for c in cs}, key=_order)


def depth_limit(text: str) -> Callable[[Cell], bool]:
    """`--max-layers`: "N" keeps the cells of at most N layers; "N,MODEL:M,..." allows MODEL
    up to M layers instead (the recipe's cold stage: "4,full:7"; "3,full:0": no FULL cell)."""
    head, *rest = [p.strip() for p in text.split(",")]
    pairs = [part.split(":", 1) if ":" in part else [part, ""] for part in rest]
    try:
        default = int(head)
        limits = {model.strip().lower(): int(value) for model, value in pairs}
    except ValueError:
        raise SweepError(
            f"--max-layers must be N or N,MODEL:M (e.g. 4,full:7), got {text!r}"
        ) from None
    known = [k for lineup in _LINEUPS.values() for k in lineup.kinds]
    unknown = [m for m in limits if m not in known]
    if unknown:
        raise SweepError(f"--max-layers: unknown model {unknown[0]!r} (one of {', '.join(known)})")
    if default < 1 or min(limits.values(), default=0) < 0:
        raise SweepError(f"--max-layers must be N >= 1 and M >= 0, got {text!r}")
    return lambda cell: cell.layers <= limits.get(cell.model, default)


def _order(cell: Cell):
    return (cell.layers, _kind_index(cell.model), COLUMNS.index(cell.column))


def _training_order(cell: Cell):
    """The order every stage trains its cells in: noise setting by noise setting, shallow
    before deep, GD++ before DIAG before FULL, so that every start precedes what it starts."""
    return (COLUMNS.index(cell.column), cell.layers, _kind_index(cell.model))


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` (1 <= K <= N) as (K, N), or a one-line SweepError."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise SweepError(f"--shard must be K/N, e.g. 2/8, got {text!r}") from None
    if not (n >= 1 and 1 <= k <= n):
        raise SweepError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def shard_cells(cells: Sequence[Cell], k: int, n: int) -> list[Cell]:
    """Shard `k` of `n` of `cells`: each cell, in decreasing order of its recipe cost (Adam
    steps × seeds × (layers + 2), whatever `--steps` says), goes to the shard with the least
    cost so far (ties: the cell first in training order, the lower shard). Deterministic in
    the asked cells alone, so N machines given the same cells and their own K split them
    into disjoint parts covering all."""

    def cost(c: Cell) -> int:
        return recipe_steps(c.model, c.layers) * recipe_seeds(c.column) * (c.layers + 2)

    load = [0] * n
    mine = []
    for cell in sorted(set(cells), key=lambda c: (-cost(c), _training_order(c))):
        j = min(range(n), key=lambda i: (load[i], i))
        load[j] += cost(cell)
        if j == k - 1:
            mine.append(cell)
    return sorted(mine, key=_order)


def read_table(path: pathlib.Path) -> dict[Cell, dict]:
    """The recorded cells of table1.csv; a duplicated or malformed row is an error."""
    if not path.exists():
        return {}
    rows: dict[Cell, dict] = {}
    reader = csv.DictReader(io.StringIO(path.read_text()))
    missing = set(TABLE_FIELDS) - set(reader.fieldnames or ()) - set(LATER_FIELDS)
    if missing:
        raise SweepError(f"{path} lacks the column {sorted(missing)[0]!r}")
    kinds = {layer_class(k).label: k for lineup in _LINEUPS.values() for k in lineup.kinds}
    for i, row in enumerate(reader, start=2):
        model = kinds.get(row["method"])
        try:
            layers = int(row["layers"])
        except (TypeError, ValueError):
            raise SweepError(f"{path}:{i}: malformed layers {row['layers']!r}") from None
        if model is None or row["noise"] not in COLUMNS or layers not in LAYERS:
            raise SweepError(
                f"{path}:{i}: not a Table 1 cell ({row['method']}, {row['layers']}, {row['noise']})"
            )
        cell = Cell(model, layers, row["noise"])
        row = {**dict.fromkeys(LATER_FIELDS, ""), **row}
        if cell in rows:
            raise SweepError(f"{path}:{i}: cell {cell.name} is recorded twice")
        rows[cell] = row
    return rows


def write_table(path: pathlib.Path, rows: dict[Cell, dict]) -> None:
    """Write table1.csv (atomically), its rows in the table's order."""
    write_csv_atomic(path, TABLE_FIELDS, (rows[c] for c in sorted(rows, key=_order)))


def _fmt(x: float) -> str:
    return f"{x:.6g}"


@contextlib.contextmanager
def results_lock(paper_dir: pathlib.Path):
    """Exclusive use of the results files while one is read, changed and rewritten, so that
    sweeps of disjoint cells may run at the same time (e.g. one per noise setting)."""
    paper_dir.mkdir(parents=True, exist_ok=True)
    with open(paper_dir / ".results.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def record_cell(paper_dir: pathlib.Path, cell: Cell, config: Config, result: dict) -> dict:
    """Add (or replace) one cell in table1.csv and write its cells/<name>.json."""
    with results_lock(paper_dir):
        return _record_cell(paper_dir, cell, config, result)


def _record_cell(paper_dir: pathlib.Path, cell: Cell, config: Config, result: dict) -> dict:
    table_path = paper_dir / "table1.csv"
    rows = read_table(table_path)
    ok = result.get("status") == "ok"
    model = result.get("model", {})
    paper = paper_table().get((MODEL_ROWS[trained_like(cell.model)], cell.layers, cell.column))
    row = {
        "method": cell.row,
        "layers": cell.layers,
        "noise": cell.column,
        "adjusted": _fmt(model["adjusted_sampled"]["mean"]) if ok else "nan",
        "adjusted_se": _fmt(model["adjusted_sampled"]["se"]) if ok else "nan",
        "exact": _fmt(model["adjusted_exact"]["mean"]) if ok else "nan",
        "exact_se": _fmt(model["adjusted_exact"]["se"]) if ok else "nan",
        "paper": "" if paper is None else _fmt(paper),
        "steps": config.train.steps,
        "seeds": config.train.seeds,
        "lr": _fmt(config.train.lr),
        "best_seed": result.get("selection", {}).get("best", ""),
        "init": _init_name(config),
        "train_seconds": f"{result.get('train_seconds', 0.0):.1f}",
        "eval_seconds": f"{result.get('eval_seconds', 0.0):.1f}",
        "status": result.get("status", "failed"),
        "pass": "",
        **_tail_columns(model if ok else {}),
    }
    rows[cell] = row
    write_table(table_path, rows)
    if ok:
        write_json_atomic(
            paper_dir / "cells" / f"{cell.name}.json",
            {
                "cell": dataclasses.asdict(cell),
                "config": config.to_dict(),
                "after_layer": model["after_layer"],
                "profile": {
                    k: result["profile"][k] for k in ("sigma", "sequences", "model", "model_se")
                },
                "selection": result.get("selection"),
                "machine": result.get("machine"),
                "select_seconds": result.get("select_seconds"),
                **({"seed_losses": result["seed_losses"]} if "seed_losses" in result else {}),
            },
            indent=1,
        )
    return row


def _tail_columns(model: dict) -> dict[str, str]:
    """The tail columns of a cell's row from its eval.json "model" ("" where an older
    evaluation did not compute them)."""
    plain, tail = model.get("exact_tail"), model.get("tail")
    out: dict[str, str] = dict.fromkeys(TAIL_FIELDS, "")
    if plain:
        out.update(exact_max=_fmt(plain["max"]), exact_top=_fmt(plain["top_share"]))
    if tail:
        out.update(
            tail=_fmt(tail["mean"]),
            tail_se=_fmt(tail["se"]),
            tail_max=_fmt(tail["max"]),
            tail_top=_fmt(tail["top_share"]),
            tail_sequences=str(tail["sequences"]),
        )
    return out


def _init_name(config: Config) -> str:
    src = config.model.init_from
    return start_name(src) if src else config.model.init


def _resumed_config(
    run_dir: pathlib.Path,
    cell: Cell,
    steps: int | None,
    seeds: int | None,
    extra: Sequence[str],
    settings: Mapping[str, Any] = MappingProxyType({}),
) -> Config | None:
    """The config of an interrupted cell's run directory if it is this recipe's with some
    start: the cell resumes from where it was, even if a better start has been recorded
    since. None if there is no such run directory."""
    from ._run import RunDirError, read_run_config

    if not (run_dir / "config.json").is_file():
        return None
    try:
        config = read_run_config(run_dir)
    except (RunDirError, ConfigError):
        return None
    try:
        same = cell_config(cell, steps, seeds, extra, config.model.init_from, settings)
    except ConfigError:
        return None
    return config if same == config else None


def _foreign_run_dirs(
    run_root: pathlib.Path,
    cells: Sequence[Cell],
    steps: int | None,
    seeds: int | None,
    extra: Sequence[str],
    settings: Mapping[str, Any] = MappingProxyType({}),
) -> list[str]:
    """The run directories of `cells` that hold a run the sweep would not resume (what
    `_resumed_config` refuses: another config than the recipe's, whatever its start), each
    with its first difference."""
    from ._run import RunDirError, config_differences, read_run_config

    out = []
    for cell in cells:
        run_dir = run_root / cell.name
        if not (run_dir / "config.json").is_file():
            continue
        try:
            config = read_run_config(run_dir)
            asked = cell_config(cell, steps, seeds, extra, config.model.init_from, settings)
        except (RunDirError, ConfigError) as e:
            out.append(f"{run_dir} ({e})")
            continue
        diffs = config_differences(config.to_dict(), asked.to_dict())
        if diffs:
            out.append(f"{run_dir} ({diffs[0]})")
    return out


def _check_run_dirs(
    root: pathlib.Path,
    cells: Sequence[Cell],
    steps: int | None,
    seeds: int | None,
    extra: Sequence[str],
    settings: Mapping[str, Any] = MappingProxyType({}),
) -> None:
    """SweepError (one line) if a run directory of `cells` under `root` holds a run the
    sweep would not resume."""
    foreign = _foreign_run_dirs(root, cells, steps, seeds, extra, settings)
    if foreign:
        n = len(foreign)
        raise SweepError(
            f"{n} run director{'y' if n == 1 else 'ies'} under {root} hold a run of another "
            "config than asked (the recipe or --steps/--seeds/--set changed since), e.g. "
            f"{foreign[0]}; move {'it' if n == 1 else 'them'} away or choose another "
            "--run-root (nothing was run)"
        )


def record_weights(
    paper_dir: pathlib.Path, cell: Cell, run_dir: pathlib.Path, result: dict
) -> None:
    """Save the selected seed's trained weights as `weights/<cell>.npz` (small; committed, so
    later cells can start from them on any machine), with its validation loss."""
    from ._model import save_weights
    from ._run import load_model

    selection = result["selection"]
    model, _ = load_model(run_dir, member=selection["best"])
    save_weights(
        model, weights_path(paper_dir, cell), select_loss=selection["losses"][selection["best"]]
    )


def seed_losses(run_dir: pathlib.Path, config: Config) -> list[dict]:
    """Every seed's final model of a finished multi-seed run, scored on one plain draw of
    `eval.sequences` test sequences (exact adjusted loss, each seed the same sequences):
    per seed, in seed order, `{"mean", "se", "max", "top_share"}` after the last layer and
    `after_layer`, the mean and se after every layer (Figure 5's bands)."""
    import jax.random as jr

    from ._evaluate import estimate_all, eval_keys
    from ._run import load_model
    from ._tail import PLAIN

    models = {
        str(k): load_model(run_dir, member=k, step=config.train.steps)[0]
        for k in range(config.train.seeds)
    }
    est = estimate_all(
        models,
        config.task,
        jr.fold_in(eval_keys(config)["test"], 1),
        config.eval.sequences,
        PLAIN,
        chunk=config.eval.chunk,
    )
    keys = ("mean", "se", "max", "top_share")
    return [
        {
            **{k: est[str(i)][-1][k] for k in keys},
            "after_layer": [{"mean": e["mean"], "se": e["se"]} for e in est[str(i)]],
        }
        for i in range(config.train.seeds)
    ]


def record_baselines(paper_dir: pathlib.Path, column: str, config: Config) -> None:
    """Score the baselines once for a noise setting (same test sequences as the cells)."""
    result = evaluate_baselines(config)
    with results_lock(paper_dir):
        _record_baselines(paper_dir, column, config, result)


def _record_baselines(paper_dir: pathlib.Path, column: str, config: Config, result: dict) -> None:
    path = paper_dir / "baselines.csv"
    rows = read_baselines(paper_dir)
    table = paper_table()
    for name, r in result["baselines"].items():
        paper = table.get((BASELINE_ROWS.get(name, ""), None, column))
        rows[(name, column)] = {
            "method": name,
            "noise": column,
            "adjusted": _fmt(r["adjusted_sampled"]["mean"]),
            "adjusted_se": _fmt(r["adjusted_sampled"]["se"]),
            "exact": _fmt(r["adjusted_exact"]["mean"]),
            "exact_se": _fmt(r["adjusted_exact"]["se"]),
            "paper": "" if paper is None else _fmt(paper),
            "params": json.dumps(result["baseline_params"], sort_keys=True),
        }
    order = sorted(rows, key=lambda k: (COLUMNS.index(k[1]), k[0]))
    write_csv_atomic(path, BASELINE_FIELDS, (rows[k] for k in order))
    write_json_atomic(
        paper_dir / "baselines" / f"{column_tag(column)}.json",
        {
            "noise": column,
            "after_layer_steps": config.model.layers,
            "profile": result["profile"],
            "baseline_params": result["baseline_params"],
        },
        indent=1,
    )


def read_baselines(paper_dir: pathlib.Path) -> dict[tuple[str, str], dict]:
    """The rows of baselines.csv keyed by (method, noise column); empty if there is none."""
    path = paper_dir / "baselines.csv"
    if not path.exists():
        return {}
    rows = csv.DictReader(io.StringIO(path.read_text()))
    return {(row["method"], row["noise"]): row for row in rows}


def recorded_baseline_columns(paper_dir: pathlib.Path) -> set[str]:
    return {noise for _, noise in read_baselines(paper_dir)}


class _Progress:
    """A progress bar over `total` units of work when `enabled` (and there is work), else
    nothing: `working(name)` shows what runs, `done(message, amount)` writes the message (above
    the bar, or through `echo` without one) and advances the bar."""

    def __init__(
        self, total: int, desc: str, unit: str, enabled: bool, echo: Callable[[str], None]
    ):
        self.echo, self.bar = echo, None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def working(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name)

    def done(self, message: str, amount: int = 1) -> None:
        if self.bar is None:
            self.echo(message)
        else:
            self.bar.write(message)
            self.bar.update(amount)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# How often a shard waiting for another shard's candidate looks at the store again (seconds).
WAIT_POLL = 5.0


def _await_inputs(
    recipe: "Recipe",
    stage: "Stage",
    cell: Cell,
    paper_dir: pathlib.Path,
    until: float,
    say: Callable[[str], None],
) -> list[str]:
    """`recipe.missing_inputs` of `cell`, after waiting for them (another sweep shard
    records them) until the `time.monotonic()` deadline `until` (0: not at all), looking
    every `WAIT_POLL` seconds; one line when it starts waiting."""
    waits = recipe.missing_inputs(stage, cell, paper_dir)
    if waits and time.monotonic() < until:
        say(
            f"{stage.name}/{cell.name} waits up to {until - time.monotonic():.0f} s for "
            f"{', '.join(waits)} (another shard's)"
        )
    while waits and time.monotonic() < until:
        time.sleep(max(0.0, min(WAIT_POLL, until - time.monotonic())))
        waits = recipe.missing_inputs(stage, cell, paper_dir)
    return waits


def _train_stage(
    stage: "Train",
    cells: Sequence[Cell],
    recipe: "Recipe",
    paper_dir: pathlib.Path,
    run_root: pathlib.Path,
    steps: int | None,
    seeds: int | None,
    extra: Sequence[str],
    force: bool,
    echo: Callable[[str], None],
    progress: bool,
    until: float = 0.0,
) -> list[dict]:
    """Train, evaluate and record this stage's candidate of every cell not yet recorded in
    it (all of them with `force`; `run_recipe` has checked their run directories), each from the GD start or (`stage.warm`) from its best
    start (`warm_start`). A warm cell whose starts are not all recorded yet waits (one line
    each; until the monotonic deadline `until` for another shard to record them, then it is
    left for a later run): it would start elsewhere than in a run from scratch. Cells run noise setting by
    noise setting, shallow before deep and GD++ before DIAG before FULL, so that every start
    is trained before the cells it starts."""
    from ._run import run

    store = stage_dir(paper_dir, stage)
    root = run_root / stage.name
    also = [stage_dir(paper_dir, recipe.stage(name)) for name in stage.starts_from]
    earlier = [stage_dir(paper_dir, st) for st in recipe.stages[: recipe.stages.index(stage)]]
    done = read_table(store / "table1.csv")
    todo = [c for c in cells if force or c not in done]
    echo(f"{stage.name}: {len(cells)} cells, {len(cells) - len(todo)} recorded, {len(todo)} to run")
    weights = {c: c.layers + 2 for c in todo}  # deeper cells cost more; for the estimate
    bar = _Progress(sum(weights.values()), stage.name, "work", progress, echo)
    out = []
    t0 = time.perf_counter()
    # Noise setting by noise setting, so that its test sequences are drawn once (see
    # eqicl.SequenceCache); shallow cells first within one.
    todo.sort(key=_training_order)
    test_cache = SequenceCache()  # the test draw of a noise setting, scored once
    try:
        for i, cell in enumerate(todo):
            config = _resumed_config(root / cell.name, cell, steps, seeds, extra, stage.settings)
            if config is None:
                waits = _await_inputs(
                    recipe, stage, cell, paper_dir, until, lambda m: bar.done(m, 0)
                )
                if waits:
                    bar.done(
                        f"[{i + 1}/{len(todo)}] {stage.name}/{cell.name} waits for "
                        f"{', '.join(waits)} (not recorded yet)",
                        weights[cell],
                    )
                    continue
                config = cell_config(cell, steps, seeds, extra, settings=stage.settings)
                if stage.unsound_only:
                    verdict = _best_so_far(earlier, cell, config)
                    if verdict is not None:
                        record_skipped(store, cell, config, verdict)
                        bar.done(
                            f"[{i + 1}/{len(todo)}] {stage.name}/{cell.name}: not needed "
                            f"({verdict['why']})",
                            weights[cell],
                        )
                        continue
                if stage.warm:
                    start = warm_start(store, cell, config, also, stage.across_noise)
                    if start is not None:
                        config = cell_config(cell, steps, seeds, extra, str(start), stage.settings)
            bar.working(cell.name)
            result = run(
                config,
                root / cell.name,
                progress=False,
                echo=lambda _: None,
                baselines=False,
                test_cache=test_cache,
            )
            if result.get("status") == "ok":
                record_weights(store, cell, root / cell.name, result)
                if config.train.seeds > 1:
                    result["seed_losses"] = seed_losses(root / cell.name, config)
            row = record_cell(store, cell, config, result)
            out.append(row)
            paper = f" (paper {row['paper']})" if row["paper"] else ""
            msg = (
                f"[{i + 1}/{len(todo)}] {stage.name}/{cell.name} (from {row['init']}): "
                f"{row['exact']} ± {row['exact_se']}{paper} {row['status']}, "
                f"{float(row['train_seconds']):.0f} s train"
            )
            bar.done(msg, weights[cell])
    finally:
        bar.close()
    echo(f"{stage.name}: {len(out)} cells in {time.perf_counter() - t0:.0f} s")
    return out


def _best_so_far(stage_dirs: Sequence[pathlib.Path], cell: Cell, config: Config) -> dict | None:
    """For a stage that trains only unsound cells: None if the cell's best candidate of the
    stages `stage_dirs` (as the table takes it) is unsound on its plain validation draw
    (`eqicl._evaluate.verdict` is `UNSOUND`: not finite, carried or imprecise), or has none,
    so the cell is to be trained; else what says it is not (`why`, the stage, the
    validation estimate). A candidate only the proposal's draw finds carried (`TAIL`) is
    not retrained: the table takes it only where no sound one comes within 10 %."""
    from ._evaluate import UNSOUND, eval_dtype, select_estimates

    source = _best_source(stage_dirs, cell)
    if source is None:
        return None
    model = start_model(weights_path(source, cell), config, eval_dtype())
    est = select_estimates(_stack([model]), config)[0]
    rank, reason = verdict(est)
    if rank == UNSOUND:
        return None
    why = (
        f"{source.name}'s candidate is sound on the plain validation draw: {est['mean']:.4g} "
        f"± {est['se']:.2g}, top 0.1 % {est['top_share']:.0%}, largest loss {est['max']:.3g}"
        + (f"; {reason}" if reason else "")
    )
    return {"why": why, "stage": source.name, "validation": est}


def record_skipped(paper_dir: pathlib.Path, cell: Cell, config: Config, verdict: dict) -> None:
    """Record that a stage did not train `cell` (status "skipped", no weights, validation
    loss inf) and why, in its row and cell file."""
    with results_lock(paper_dir):
        _record_cell(paper_dir, cell, config, {"status": "skipped"})
        write_json_atomic(
            paper_dir / "cells" / f"{cell.name}.json",
            {"cell": dataclasses.asdict(cell), "config": config.to_dict(), "skipped": verdict},
            indent=1,
        )


def _recorded_selection(paper_dir: pathlib.Path, cell: Cell) -> tuple[float, int]:
    """A recorded cell's selected seed's validation loss (inf if not recorded, failed or not
    finite) and its rank on validation (`eqicl._evaluate.verdict`: `selection.rank`; records
    with only `selection.sound` rank sound or unsound, records from before either as sound),
    from one read of its cell file."""
    path = paper_dir / "cells" / f"{cell.name}.json"
    try:
        selection = json.loads(path.read_text())["selection"]
        best = selection["best"]
        loss = float(selection["losses"][best])
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        return math.inf, UNSOUND
    try:
        rank = int(selection["rank"][best])
    except (KeyError, TypeError, IndexError, ValueError):
        try:
            rank = SOUND if selection["sound"][best] else UNSOUND
        except (KeyError, TypeError, IndexError):
            rank = SOUND
    return (loss if math.isfinite(loss) else math.inf), rank


def validation_loss(paper_dir: pathlib.Path, cell: Cell) -> float:
    """A recorded cell's validation loss (its selected seed's loss on the held-out selection
    sequences, which depend only on the task and `eval.seed`); inf if not recorded or failed."""
    return _recorded_selection(paper_dir, cell)[0]


def validation_key(paper_dir: pathlib.Path, cell: Cell) -> tuple[bool, float]:
    """How a recorded candidate ranks against the others (`eqicl._evaluate.rank_key` of its
    rank on validation and `validation_loss`; not recorded: (True, inf))."""
    loss, rank = _recorded_selection(paper_dir, cell)
    return rank_key(rank, loss)


def _validated_by(paper_dir: pathlib.Path, cell: Cell) -> str | None:
    """How a recorded candidate's validation loss was estimated, from the config in its cell
    file: "plain N" (eqicl before the tail-aware selection), "tail-aware N (proposal)" with
    the proposal it was drawn from (`train.select_proposal_*`, or before those existed
    `eval.proposal_*`), "plain N and tail-aware N (proposal)" for records ranked on both
    draws (`selection.rank`, `eqicl._evaluate.verdict`); None without a readable cell file
    or for a cell the stage skipped (no candidate)."""
    try:
        data = json.loads((paper_dir / "cells" / f"{cell.name}.json").read_text())
        ev, tr = data["config"]["eval"], data["config"]["train"]
        n = tr["select_sequences"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None
    if "skipped" in data:
        return None
    both = isinstance(data.get("selection"), dict) and "rank" in data["selection"]
    for section, prefix in ((tr, "select_proposal"), (ev, "proposal")):
        if f"{prefix}_x" in section:
            x, w, shares = (section[f"{prefix}_{k}"] for k in ("x", "w", "shares"))
            return f"{f'plain {n} and ' if both else ''}tail-aware {n} ({x}, {w}, {shares})"
    return f"plain {n}"


def merge_choices(
    passes: Sequence[pathlib.Path],
) -> tuple[dict[pathlib.Path, dict[Cell, dict]], list[tuple[Cell, pathlib.Path, dict]]]:
    """What `merge` takes, without writing anything: the passes' tables, and for every cell
    recorded in any of them, the pass whose candidate ranks first (`validation_key`: sound
    on validation before unsound, then the lower validation loss; ties to the earlier
    pass; a cell failed everywhere comes from the first pass that has it) and the losses."""
    tables = {}
    for p in passes:
        if not (p / "table1.csv").is_file():
            raise SweepError(f"{p / 'table1.csv'} does not exist: run that sweep pass first")
        tables[p] = read_table(p / "table1.csv")
    if len({p.name for p in passes}) != len(passes):
        raise SweepError("the passes must be directories with distinct names")
    choices = []
    for cell in sorted({c for t in tables.values() for c in t}, key=_order):
        how = {p.name: _validated_by(p, cell) for p in passes if cell in tables[p]}
        if len({v for v in how.values() if v is not None}) > 1:
            raise SweepError(
                f"{cell.name}: its candidates' validation losses were estimated differently ("
                + ", ".join(f"{k}: {v}" for k, v in how.items())
                + "), so they cannot be compared; rerun the stages with one version of eqicl"
            )
        keys = {
            p: validation_key(p, cell) if cell in tables[p] else (True, math.inf) for p in passes
        }
        losses = {p: keys[p][1] for p in passes}
        best = min(passes, key=lambda p: keys[p])  # by rank on validation, then the lower loss
        if not math.isfinite(losses[best]):
            best = next(p for p in passes if cell in tables[p])  # all failed: say so
        choices.append((cell, best, losses))
    return tables, choices


def merge(
    passes: Sequence[pathlib.Path], paper_dir: pathlib.Path, echo: Callable[[str], None] = print
) -> dict[str, int]:
    """The recipe's last step: each cell of `paper_dir` becomes the best, by validation loss, of
    its records in the sweep passes `passes` (each a paper directory, e.g. a `--cold` pass and
    a warm-started one): its table row (with `pass` naming the pass), `cells/<cell>.json` and
    `weights/<cell>.npz`. Never the test loss. Returns how many cells each pass gave."""
    import shutil

    counts = {p.name: 0 for p in passes}
    with results_lock(paper_dir):
        # Chosen under the lock, so that concurrent merges (sweep shards) are serialised and
        # each reads every candidate recorded before it began: the last one is never stale.
        tables, choices = merge_choices(passes)
        rows = read_table(paper_dir / "table1.csv")
        for cell, best, losses in choices:
            counts[best.name] += 1
            kept = {k: rows.get(cell, {}).get(k, "") for k in TEST_FIELDS}  # score_table
            rows[cell] = {**tables[best][cell], "pass": best.name, **kept}  # checks them
            (paper_dir / "cells").mkdir(parents=True, exist_ok=True)
            src = best / "cells" / f"{cell.name}.json"
            if src.is_file():
                data = json.loads(src.read_text())
                data["pass"] = best.name
                data["validation_by_pass"] = {p.name: losses[p] for p in passes}
                write_json_atomic(paper_dir / "cells" / f"{cell.name}.json", data, indent=1)
            if weights_path(best, cell).is_file():
                weights_path(paper_dir, cell).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(weights_path(best, cell), weights_path(paper_dir, cell))
        write_csv_atomic(
            paper_dir / "table1.csv", TABLE_FIELDS, (rows[c] for c in sorted(rows, key=_order))
        )
    echo("merged: " + ", ".join(f"{n} cells from {k}" for k, n in counts.items()))
    return counts


def _polish_stage(
    stage: "Polish",
    cells: Sequence[Cell],
    recipe: "Recipe",
    paper_dir: pathlib.Path,
    extra: Sequence[str],
    force: bool,
    echo: Callable[[str], None],
    progress: bool,
    until: float = 0.0,
) -> list[dict]:
    """A stage that trains nothing with Adam (a cell waits for its inputs as in
    `_train_stage`, until the monotonic deadline `until`). Each cell, once the earlier stages have
    recorded it, gets these candidates, starting from its best candidate of those stages
    (by validation loss, as the table takes it):
    - those weights;
    - for GD++ and DIAG, those weights polished (`eqicl._polish.polish`: L-BFGS on the exact
      objective over `stage.sequences` fixed sequences, float64), and `stage.starts - 1`
      perturbed copies of them polished (FULL is not polished: its 242 parameters per layer
      fit the sample's rare heavy sequences instead);
    - the cells of a narrower kind and the same depth recorded by this stage (GD++ into DIAG
      and FULL, DIAG into FULL), embedded exactly.
    The best on the cell's validation sequences is evaluated and recorded like a trained
    cell (`init` names the source, `steps` the L-BFGS iterations; its cell file lists the
    candidates and their validation losses). The starting weights are a candidate, so a
    cell never gets worse by the ranking (`selection_keys`: sound first, then the mean).
    Recorded cells are skipped unless `force`."""
    import jax.random as jr
    import numpy as np

    from ._evaluate import cast, eval_dtype, evaluate, select_estimates, selection_record
    from ._model import save_weights
    from ._polish import perturb, polish
    from ._task import prng_key

    store = stage_dir(paper_dir, stage)
    earlier = [stage_dir(paper_dir, st) for st in recipe.stages[: recipe.stages.index(stage)]]
    done = read_table(store / "table1.csv")
    todo = sorted((c for c in cells if force or c not in done), key=_training_order)
    echo(f"{stage.name}: {len(cells)} cells, {len(cells) - len(todo)} recorded, {len(todo)} to run")
    starts, iterations, sequences = stage.starts, stage.iterations, stage.sequences
    bar = _Progress(len(todo), stage.name, "cell", progress, echo)
    out = []
    t_all = time.perf_counter()
    test_cache = SequenceCache()  # the test draw of a noise setting, scored once
    try:
        for i, cell in enumerate(todo):
            waits = _await_inputs(recipe, stage, cell, paper_dir, until, lambda m: bar.done(m, 0))
            source = _best_source(earlier, cell)
            if waits or source is None:
                why = (
                    f"waits for {', '.join(waits)} (not recorded yet)"
                    if waits
                    else ("has no trained candidate to start from (every earlier one failed)")
                )
                bar.done(f"[{i + 1}/{len(todo)}] {stage.name}/{cell.name} {why}")
                continue
            bar.working(cell.name)
            src = weights_path(source, cell)
            config = cell_config(cell, iterations, 1, extra, str(src))
            t0 = time.perf_counter()
            model = start_model(src, config, eval_dtype())
            candidates, names = [model], [start_name(src)]
            if cell.model != "full":
                # Not one of the tune / test / profile / select keys (eqicl._evaluate).
                key = jr.fold_in(prng_key(config.eval.seed), 4)
                firsts = [model] + [
                    perturb(model, jr.fold_in(key, 1000 + k)) for k in range(1, starts)
                ]
                polished, _ = polish(firsts, config.task, key, sequences, iterations)
                candidates += [cast(m, eval_dtype()) for m in polished]
                names += [f"polished start {k}" for k in range(starts)]
            for narrower in narrower_kinds(cell.model):
                path = weights_path(store, Cell(narrower, cell.layers, cell.column))
                if path.is_file():
                    candidates.append(start_model(path, config, eval_dtype()))
                    names.append(start_name(path))
            t_select = time.perf_counter()
            estimates = select_estimates(_stack(candidates), config)
            keys = selection_keys(estimates)
            losses = np.asarray([loss for _, loss in keys], np.float64)
            best = min(range(len(keys)), key=lambda k: keys[k])  # by rank, then the loss
            select_seconds = time.perf_counter() - t_select
            train_seconds = t_select - t0
            t1 = time.perf_counter()
            result: dict[str, Any] = evaluate(
                candidates[best], config, baselines=False, test_cache=test_cache
            )
            selection = {
                **selection_record(estimates),
                "best": best,
                "candidates": names,
            }
            if not result["model"]["finite"]:
                result = {"status": "failed", "reason": "non-finite predictions"}
            else:
                result.update(status="ok", eval_seconds=time.perf_counter() - t1)
                save_weights(
                    candidates[best],
                    weights_path(store, cell),
                    select_loss=float(losses[best]),
                )
            result.update(
                selection=selection,
                train_seconds=train_seconds,
                select_seconds=select_seconds,
                machine=machine_line(),
            )
            row = record_cell(store, cell, config, result)
            out.append(row)
            msg = (
                f"[{i + 1}/{len(todo)}] {stage.name}/{cell.name}: {row['exact']} ± "
                f"{row['exact_se']} "
                f"(paper {row['paper']}), {names[best]}: validation {losses[0]:.4g} -> "
                f"{losses[best]:.4g}, {train_seconds:.0f} s"
            )
            bar.done(msg)
    finally:
        bar.close()
    echo(f"{stage.name}: {len(out)} cells in {time.perf_counter() - t_all:.0f} s")
    return out


# ---------------------------------------------------------------------------------------------
# The recipe as data, the candidate store and the one driver.


@dataclasses.dataclass(frozen=True)
class Train:
    """A stage that trains its cells with Adam (`eqicl.run`, the recipe's config of each
    cell): from the GD start, or with `warm` from the best (on the cell's validation
    sequences) of the candidates that embed exactly into it (`start_candidates`) recorded by
    this stage or by the stages `starts_from`, and with `across_noise` also the same model
    and depth of the neighbouring noise settings recorded by `starts_from`. `max_layers`
    (as `--max-layers`) says which cells the stage covers. `settings` are TrainConfig
    fields this stage trains with (before the user's `--set`). With `unsound_only` the stage
    trains only the cells whose best candidate of the earlier stages is unsound on its
    validation sequences (`unsound`); for the others it records why it did not."""

    name: str
    max_layers: str = "7"
    warm: bool = False
    starts_from: tuple[str, ...] = ()
    across_noise: bool = False
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    unsound_only: bool = False


@dataclasses.dataclass(frozen=True)
class Polish:
    """A stage that refines the best candidate so far of each covered cell by L-BFGS
    (`eqicl.polish`: `starts` starts, the weights and perturbed copies, `iterations`
    iterations on `sequences` fixed sequences) and offers the stage's narrower cells of the
    same depth (see `_polish_stage`)."""

    name: str
    max_layers: str = "3"
    starts: int = 4
    iterations: int = 50
    sequences: int = 20_000


Stage = Train | Polish


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Stages run in order; each records one candidate per covered cell in
    `<paper-dir>/candidates/<stage>/`, and the table is the best candidate of every cell by
    validation loss."""

    stages: tuple[Stage, ...]

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise SweepError(f"a recipe's stages need distinct names, got {names}")
        for i, st in enumerate(self.stages):
            depth_limit(st.max_layers)
            if isinstance(st, Train):
                bad = [n for n in st.starts_from if n not in names[:i]]
                if bad:
                    raise SweepError(
                        f"stage {st.name} starts from {bad[0]!r}, not an earlier stage"
                    )
                if st.across_noise and not st.starts_from:
                    raise SweepError(f"stage {st.name}: across_noise takes its starts_from stages")
                try:
                    dataclasses.replace(TrainConfig(), **st.settings)
                except (TypeError, ConfigError) as e:
                    raise SweepError(f"stage {st.name}: bad settings ({e})") from None

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def covers(self, stage: Stage, cell: Cell) -> bool:
        return depth_limit(stage.max_layers)(cell)

    def inputs(self, stage: Stage, cell: Cell) -> list[tuple[Stage, Cell]]:
        """The candidates this stage's `cell` is made from, whether recorded or not: the
        deterministic result of a stage needs all of them."""
        out: list[tuple[Stage, Cell]] = []
        if isinstance(stage, Train) and stage.warm:
            own = [self.stage(n) for n in stage.starts_from] + [stage]
            out += [(s, c) for c in start_candidates(cell) for s in own if self.covers(s, c)]
            if stage.across_noise:
                starts = [self.stage(n) for n in stage.starts_from]
                out += [
                    (s, c) for c in neighbour_candidates(cell) for s in starts if self.covers(s, c)
                ]
        if isinstance(stage, Train) and stage.unsound_only:
            earlier = self.stages[: self.stages.index(stage)]
            out += [(s, cell) for s in earlier if self.covers(s, cell)]
        elif isinstance(stage, Polish):
            earlier = self.stages[: self.stages.index(stage)]
            out += [(s, cell) for s in earlier if self.covers(s, cell)]
            narrower = [Cell(m, cell.layers, cell.column) for m in narrower_kinds(cell.model)]
            out += [(stage, c) for c in narrower if self.covers(stage, c)]
        return out

    def missing_inputs(self, stage: Stage, cell: Cell, paper_dir: pathlib.Path) -> list[str]:
        """`inputs` not recorded yet, as `<stage>/<cell>`."""
        tables: dict[str, dict] = {}
        out = []
        for s, c in self.inputs(stage, cell):
            if s.name not in tables:
                tables[s.name] = read_table(stage_dir(paper_dir, s) / "table1.csv")
            if c not in tables[s.name]:
                out.append(f"{s.name}/{c.name}")
        return out


# The tail stage's training (README "Estimates and tails"): batches drawn from the selection's
# proposal and importance-weighted, so the objective is the expectation with its rare
# sequences at their full weight; float64, since a model can overflow float32 on them; the
# soft cap and the divergence guard only as numerical guards far above typical losses (an
# importance-weighted batch loss jumps tenfold whenever a rare sequence is drawn).
TAIL_SETTINGS = MappingProxyType(
    {
        "proposal_x": (1.0, 1.1, 1.2),
        "proposal_w": (1.0, 1.0, 1.1),
        "proposal_shares": (0.5, 0.25, 0.25),
        "dtype": "float64",
        "loss_clip": 1000.0,
        "explode_factor": 1000.0,
    }
)

RECIPE = Recipe(
    (
        Train("cold", max_layers="4,full:7"),
        Train("warm", warm=True, starts_from=("cold",), across_noise=True),
        Train(
            "tail",
            warm=True,
            starts_from=("cold", "warm"),
            settings=TAIL_SETTINGS,
            unsound_only=True,
        ),
        Polish("polish", max_layers="3"),
    )
)
"""The recipe of Table 1 (README "Reproducing the paper"): a cold stage (the cells of 1-4
layers and FULL at every depth from the GD start), a warm stage (every cell from its best
start across both), a tail stage (the cells whose best candidate so far is unsound on
validation, trained on the expectation with its rare sequences weighted in, from their best
start), and a polish stage for the cells of at most 3 layers."""


def stage_dir(paper_dir: pathlib.Path, stage: Stage) -> pathlib.Path:
    """Where a stage's candidates live: `<paper-dir>/candidates/<stage>/`, laid out as a
    paper directory (table1.csv, cells/, weights/)."""
    return paper_dir / "candidates" / stage.name


def _best_source(stage_dirs: Sequence[pathlib.Path], cell: Cell) -> pathlib.Path | None:
    """The stage directory holding the cell's best recorded candidate by validation loss
    (ties to the earlier stage; None if no stage has a finite one), as the table takes it."""
    keys = [(validation_key(d, cell), d) for d in stage_dirs]
    best = min(keys, key=lambda t: t[0], default=((True, math.inf), None))
    return best[1] if math.isfinite(best[0][1]) else None


def run_recipe(
    cells: Sequence[Cell],
    paper_dir: pathlib.Path,
    run_root: pathlib.Path,
    steps: int | None = None,
    seeds: int | None = None,
    extra: Sequence[str] = (),
    force: bool = False,
    echo: Callable[[str], None] = print,
    progress: bool = True,
    recipe: Recipe | None = None,
    test_seed: int = TEST_SEED,
    test_sequences: int = TEST_SEQUENCES,
    shard: tuple[int, int] | None = None,
    wait: float = 0.0,
) -> dict[str, int]:
    """The whole recipe for `cells`, from scratch or from wherever it stopped: the baselines
    of their noise settings (once, in `paper_dir`), every stage in order (each skips the
    cells it has recorded, unless `force`, and says which cells wait for inputs not
    recorded yet), then the table: `paper_dir/table1.csv`, `cells/`, `weights/` as the best
    candidate of every recorded cell (`assemble`). `steps` and `seeds` are the Adam stages'
    (None: the recipe's steps); `extra` are `--set` overrides for every cell. Returns how many
    cells the table takes from each stage. `recipe`: default `RECIPE`. Last, the table's
    cells are scored on `test_sequences` sequences of the test seed `test_seed`
    (`eqicl._score.score_table`, the `test*` columns; 0 sequences: not scored), each cell
    once for its weights.

    With `shard=(K, N)` only shard K of N of `cells` (`shard_cells`) is trained and scored,
    and a cell whose inputs another shard makes waits up to `wait` seconds for them in all
    (then it is left, said, for a later run); N processes on one shared `paper_dir` and
    `run_root` make the whole, and a last run without a shard assembles and scores the
    table (every cell recorded: nothing retrains)."""
    recipe = recipe or RECIPE
    if shard is not None:
        k, n = shard
        everything = len(cells)
        cells = shard_cells(cells, k, n)
        echo(f"shard {k}/{n}: {len(cells)} of the {everything} cells")
        if not cells:
            return {}
    until = time.monotonic() + wait if wait > 0 else 0.0
    for cell in cells:  # every config is checked before anything runs
        for stage in recipe.stages:
            try:
                cell_config(cell, steps, seeds, extra, settings=getattr(stage, "settings", {}))
            except ConfigError as e:
                raise SweepError(f"cell {cell.name}: {e}") from None
    for stage in recipe.stages:  # and every run directory, before anything is written
        if isinstance(stage, Train):
            done = read_table(stage_dir(paper_dir, stage) / "table1.csv")
            todo = [c for c in cells if recipe.covers(stage, c) and (force or c not in done)]
            _check_run_dirs(run_root / stage.name, todo, steps, seeds, extra, stage.settings)
    columns = sorted({c.column for c in cells}, key=COLUMNS.index)
    have = recorded_baseline_columns(paper_dir)
    for column in columns:  # once: the baselines are no candidates, --force leaves them
        if column not in have:
            echo(f"baselines for noise {column}")
            record_baselines(
                paper_dir, column, cell_config(Cell("diag", 3, column), steps, seeds, extra)
            )
    for stage in recipe.stages:
        covered = [c for c in cells if recipe.covers(stage, c)]
        if isinstance(stage, Train):
            _train_stage(
                stage,
                covered,
                recipe,
                paper_dir,
                run_root,
                steps,
                seeds,
                extra,
                force,
                echo,
                progress,
                until,
            )
        else:
            _polish_stage(stage, covered, recipe, paper_dir, extra, force, echo, progress, until)
    counts = assemble(paper_dir, recipe, echo)
    if test_sequences and counts:
        score_table(paper_dir, test_seed, test_sequences, cells, echo, progress)
    return counts


def assemble(
    paper_dir: pathlib.Path, recipe: Recipe | None = None, echo: Callable[[str], None] = print
) -> dict[str, int]:
    """The table: every cell recorded by a stage becomes its best candidate by validation
    loss (`merge` of the stage directories; never the test loss)."""
    recipe = recipe or RECIPE
    dirs = [d for st in recipe.stages if (d := stage_dir(paper_dir, st) / "table1.csv").is_file()]
    if not dirs:
        echo("no candidates recorded yet")
        return {}
    return merge([d.parent for d in dirs], paper_dir, echo)


def costs(
    cells: Sequence[Cell], paper_dir: pathlib.Path, recipe: Recipe | None = None
) -> list[str]:
    """What the recorded candidates of `cells` cost, one line per stage then the sum: how
    many cells it recorded (and how many it has still to run or found not needed), the
    training, validation (the seeds' selection) and evaluation seconds summed (each one
    process's wall time, so on N parallel processes the wall time is about the sum over N),
    and the machines its cells' records name. What a run resumed across sessions cost in
    all, where the wall time of its last invocation says only what that one did. Reads only."""
    recipe = recipe or RECIPE
    lines = []
    total = [0, 0.0, 0.0, 0.0]
    for st in recipe.stages:
        store = stage_dir(paper_dir, st)
        rows = read_table(store / "table1.csv")
        covered = [c for c in cells if recipe.covers(st, c)]
        done = [c for c in covered if c in rows and rows[c]["status"] != "skipped"]
        skipped = sum(1 for c in covered if c in rows and rows[c]["status"] == "skipped")
        train = sum(float(rows[c]["train_seconds"] or 0) for c in done)
        evals = sum(float(rows[c]["eval_seconds"] or 0) for c in done)
        machines: dict[str, int] = {}
        select, unselected = 0.0, 0
        for c in done:
            path = store / "cells" / f"{c.name}.json"
            record = json.loads(path.read_text()) if path.is_file() else {}
            name = record.get("machine") or (
                "machine not recorded" if record else "no cell record (not ok)"
            )
            machines[name] = machines.get(name, 0) + 1
            if record.get("select_seconds") is None:
                unselected += 1
            else:
                select += float(record["select_seconds"])
        left = len(covered) - len(done) - skipped
        lines.append(
            f"{st.name:<8} {len(done):>4} of {len(covered)} cells recorded"
            + (f", {skipped} not needed" if skipped else "")
            + (f", {left} to run" if left else "")
            + f"; train {train:,.0f} s, validation {select:,.0f} s"
            + (f" (not recorded for {unselected})" if unselected else "")
            + f", eval {evals:,.0f} s"
            + (
                " (" + "; ".join(f"{n}: {k}" for n, k in sorted(machines.items())) + ")"
                if machines
                else ""
            )
        )
        total = [total[0] + len(done), total[1] + train, total[2] + select, total[3] + evals]
    lines.append(
        f"{'all':<8} {total[0]:>4} candidates; train {total[1]:,.0f} s, validation "
        f"{total[2]:,.0f} s, eval {total[3]:,.0f} s, {sum(total[1:]):,.0f} s in all"
    )
    return lines


def listing(
    cells: Sequence[Cell],
    paper_dir: pathlib.Path,
    steps: int | None,
    seeds: int | None,
    extra: Sequence[str],
    recipe: Recipe | None = None,
) -> list[str]:
    """One line per cell: each stage's candidate (its validation loss, `(unsound)` if it is
    unsound on validation, `(tail)` if only the proposal's draw finds it carried; `to run`, `waits` for
    unrecorded inputs, or `-` where the stage does not cover the cell) and the stage the
    table takes (`table=<stage>`); a recorded Adam candidate whose steps, lr or seeds differ
    from what is asked now says so. Reads only."""
    recipe = recipe or RECIPE
    tables = {st.name: read_table(stage_dir(paper_dir, st) / "table1.csv") for st in recipe.stages}
    lines = []
    for cell in cells:
        parts, best, best_key = [], None, (True, math.inf)
        changed = []
        asked_now = {  # every stage's config, checked even where nothing is recorded
            st.name: cell_config(cell, steps, seeds, extra, settings=st.settings).train
            for st in recipe.stages
            if isinstance(st, Train)
        }
        for st in recipe.stages:
            if not recipe.covers(st, cell):
                parts.append(f"{st.name}=-")
                continue
            row = tables[st.name].get(cell)
            if row is None:
                waiting = recipe.missing_inputs(st, cell, paper_dir)
                parts.append(f"{st.name}={'waits' if waiting else 'to-run'}")
                continue
            if row["status"] == "skipped":
                parts.append(f"{st.name}=not-needed")
                continue
            loss, rank = _recorded_selection(stage_dir(paper_dir, st), cell)  # one read
            key = rank_key(rank, loss)
            mark = {SOUND: "", TAIL: "(tail)"}.get(rank, "(unsound)")
            parts.append(f"{st.name}={key[1]:.6g}{mark}")
            if key < best_key:  # the table's ranking: by rank, then the lower loss
                best, best_key = st.name, key
            if isinstance(st, Train):
                now = asked_now[st.name]
                asked = {"steps": now.steps, "lr": now.lr, "seeds": now.seeds}
                changed += [f"{st.name}.{k}={v:g}" for k, v in asked.items() if float(row[k]) != v]
        table = f"table={best}" if best else "table=-"
        after = f" (asked now: {' '.join(changed)})" if changed else ""
        lines.append(f"{cell.name:<16} {' '.join(parts)} {table}{after}")
    return lines
