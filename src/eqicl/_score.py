"""Table 1 as estimates of the expectation: every cell's weights scored on a test draw of its
own, with the plain and the tail-aware estimator (SPEC §9).

A test seed S fixes the draw: the models of noise setting `column` are scored together on
`sequences` sequences from `fold_in(fold_in(prng_key(S), COLUMNS.index(column)), j)`, j = 0
for plain sampling and 1 for the tail-aware proposal (`eqicl.DEFAULT`). Nothing in training
or selection draws from such a key (their keys derive from `eval.seed` and the training seed),
so the test seed is used nowhere else. `python -m analysis.reeval` scores on any seed;
`score_table` writes the score into the table's `test*` columns (the sweep's last step).
"""

import hashlib
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence

from ._model import LinearTransformer

# table1.csv's columns of the score: the plain estimate (mean, se, largest loss, top 0.1 %
# share), the tail-aware one on as many sequences, and what they were computed on.
TEST_FIELDS = (
    "test",
    "test_se",
    "test_max",
    "test_top",
    "test_tail",
    "test_tail_se",
    "test_tail_max",
    "test_tail_top",
    "test_sequences",
    "test_seed",
    "test_weights",
)
TEST_SEED = 2027
"""The test seed of the committed table's `test*` columns (a second seed checks them:
`python -m analysis.reeval --seed 2028`)."""
TEST_SEQUENCES = 1_000_000


def score_models(
    models: Mapping[str, LinearTransformer],
    column: str,
    seed: int,
    sequences: int,
    chunk: int = 50_000,
    progress: Callable[[int], object] | None = None,
) -> dict[str, dict[str, dict]]:
    """The models of one noise setting (a Table 1 column) on the test draw of `seed`:
    `{name: {"plain": summary, "tail": summary}}`, each an `eqicl.summarize` dict of the
    exact adjusted loss after the last layer. `progress(sequences done)` after every chunk,
    counting both estimates."""
    import jax.random as jr

    from ._evaluate import estimate_all
    from ._sweep import COLUMNS, task_for
    from ._tail import DEFAULT, PLAIN
    from ._task import prng_key

    root = jr.fold_in(prng_key(seed), COLUMNS.index(column))
    out: dict[str, dict[str, dict]] = {name: {} for name in models}
    for j, (kind, proposal) in enumerate((("plain", PLAIN), ("tail", DEFAULT))):
        offset = j * sequences

        def tick(done, offset=offset):
            if progress is not None:
                progress(offset + done)

        est = estimate_all(
            dict(models),
            task_for(column),
            jr.fold_in(root, j),
            sequences,
            proposal,
            chunk=chunk,
            progress=tick,
        )
        for name in models:
            out[name][kind] = est[name][-1]
    return out


def weights_digest(path: pathlib.Path) -> str:
    """A short digest of a weights file: a score is redone when the weights change."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _g(x: float) -> str:
    return f"{x:.6g}"


def estimate_columns(prefix: str, est: dict) -> dict[str, str]:
    """One estimate (a summary of `estimate_all`) as the four CSV columns every table of
    eqicl writes: `<prefix>` (mean), `<prefix>_se`, `<prefix>_max` (largest per-sequence
    loss) and `<prefix>_top` (share of the mean carried by the top 0.1 %)."""
    return {
        prefix: _g(est["mean"]),
        f"{prefix}_se": _g(est["se"]),
        f"{prefix}_max": _g(est["max"]),
        f"{prefix}_top": _g(est["top_share"]),
    }


def score_columns(plain: dict, tail: dict, sequences: int, seed: int, digest: str) -> dict:
    """The `test*` columns of a row from the two estimates of its cell."""
    return {
        **estimate_columns("test", plain),
        **estimate_columns("test_tail", tail),
        "test_sequences": str(sequences),
        "test_seed": str(seed),
        "test_weights": digest,
    }


def score_table(
    paper_dir: pathlib.Path,
    seed: int = TEST_SEED,
    sequences: int = TEST_SEQUENCES,
    cells: Sequence | None = None,
    echo: Callable[[str], None] = print,
    progress: bool = True,
    chunk: int = 50_000,
) -> int:
    """Score the table's cells (all, or those of `cells`) whose weights have no score on
    (`seed`, `sequences`) yet, or changed since, and write it into their rows' `test*`
    columns. Returns how many cells were scored."""
    from tqdm import tqdm

    from ._model import load_weights
    from ._sweep import COLUMNS, read_table, results_lock, weights_path, write_table

    table = paper_dir / "table1.csv"
    rows = read_table(table)
    wanted = set(cells) if cells is not None else set(rows)
    todo: dict[str, list] = {}
    digests = {}
    for cell, row in rows.items():
        path = weights_path(paper_dir, cell)
        if cell not in wanted or not path.is_file():
            continue
        digests[cell] = weights_digest(path)
        done = (row.get("test_seed"), row.get("test_sequences"), row.get("test_weights"))
        if done != (str(seed), str(sequences), digests[cell]):
            todo.setdefault(cell.column, []).append(cell)
    n = sum(len(v) for v in todo.values())
    if not n:
        return 0
    echo(f"score: {n} cells on test seed {seed}, {sequences:,} sequences per estimate")
    bar = tqdm(total=2 * sequences * len(todo), unit="seq", unit_scale=True, disable=not progress)
    scored = 0
    try:
        for column in sorted(todo, key=COLUMNS.index):
            group = todo[column]
            models = {c.name: load_weights(weights_path(paper_dir, c))[0] for c in group}
            base = bar.n
            bar.set_postfix_str(f"noise {column}")
            est = score_models(
                models,
                column,
                seed,
                sequences,
                chunk,
                lambda d, base=base: bar.update(base + d - bar.n),
            )
            with results_lock(paper_dir):  # a row at a time, so an interruption keeps what is done
                rows = read_table(table)
                for c in group:
                    e = est[c.name]
                    rows[c] = {
                        **rows[c],
                        **score_columns(e["plain"], e["tail"], sequences, seed, digests[c]),
                    }
                write_table(table, rows)
            scored += len(group)
            worst = max(group, key=lambda c: _ratio(est[c.name]["plain"]["mean"], rows[c]))
            echo(
                f"score: noise {column}, {len(group)} cells; worst {worst.name} "
                f"{est[worst.name]['plain']['mean']:.4g} ± {est[worst.name]['plain']['se']:.2g}"
                f" (paper {rows[worst]['paper'] or '-'})"
            )
    finally:
        bar.close()
    return scored


def _ratio(value: float, row: dict) -> float:
    paper = float(row["paper"]) if row.get("paper") else math.nan
    if not math.isfinite(value):
        return math.inf
    return value / paper if paper > 0 else value


def score(model: LinearTransformer | None, batch, tune_on=None, gd_steps: int | None = None):
    """A model and the baselines on a batch of one's own (`eqicl.Batch`, e.g. from
    `eqicl.sample_batch` or a custom sampler), in one call: `{"model": [summary after every
    layer], "baselines": {method: summary}, "tuned": TunedBaselines}`, each summary an
    `eqicl.summarize` dict of the exact adjusted loss ½‖ŵ − μ‖² (SPEC §5: the loss over the
    query in closed form, minus the oracle's). The tuned baselines (ConstRR, TunedRR, GD with
    a tuned step) are fitted on `tune_on` (another batch of the same law), or on `batch`
    itself if None, which flatters them slightly. `gd_steps`: GD's step count (default: the
    model's depth, else 1). `model=None` scores the baselines only."""
    import jax
    import numpy as np

    from ._baselines import exact_loss, spectral, tune_baselines
    from ._evaluate import cast, eval_dtype, model_exact_losses
    from ._tail import summarize

    dt = eval_dtype()
    batch = jax.tree.map(lambda a: a.astype(dt) if hasattr(a, "astype") else a, batch)
    sp = spectral(batch)
    steps = gd_steps or (model.num_layers if model is not None else 1)
    tune_sp = (
        sp
        if tune_on is None
        else spectral(jax.tree.map(lambda a: a.astype(dt) if hasattr(a, "astype") else a, tune_on))
    )
    tuned = tune_baselines(tune_sp, gd_steps=steps)
    out = {"tuned": tuned, "baselines": {}}
    for name, coords in tuned.coords(sp).items():
        if name != "oracle":
            out["baselines"][name] = summarize(np.asarray(exact_loss(sp, coords)))
    if model is not None:
        losses = np.asarray(model_exact_losses(cast(model, dt), batch, sp))  # (batch, layers)
        out["model"] = [summarize(losses[:, k]) for k in range(losses.shape[1])]
    return out
