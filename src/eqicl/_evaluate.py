"""Evaluation (SPEC §5): adjusted loss with the sampled and the exact estimator, baselines on
the same sequences, loss after k layers, unadjusted loss, per-variance profiles."""

import dataclasses
import math
import typing
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._baselines import (
    Spectral,
    TunedBaselines,
    exact_loss,
    posterior_trace,
    sampled_loss,
    spectral,
    tune_baselines,
)
from ._config import Config, TaskConfig
from ._fast import (
    Stats,
    context_stats,
    layer_weights,
    posterior_mean,
    sample_weighted_batch,
    sample_weighted_stats,
)
from ._model import LinearTransformer
from ._paper import paper_baselines, paper_value
from ._tail import DEFAULT, PLAIN, Proposal, summarize
from ._task import Batch, prng_key, sample_batch_jit as sample_batch


def eval_dtype():
    """float64 where JAX allows it (evaluation must resolve losses down to 1e-12)."""
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def cast(tree, dtype):
    """Cast every floating-point array of a pytree (a model, say) to `dtype`."""
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


def mean_se(values) -> dict[str, float]:
    """Mean and standard error of per-sequence values."""
    v = np.asarray(values, np.float64)
    return {
        "mean": float(v.mean()),
        "se": float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan,
    }


@eqx.filter_jit
def model_weights_and_predictions(
    model: LinearTransformer,
    x: Float[Array, "batch n d"],
    y: Float[Array, "batch n"],
    xq: Float[Array, "batch d"],
) -> tuple[Float[Array, "batch layers d"], Float[Array, "batch layers"]]:
    """w^l of every layer and the prediction <w^l, x_q> on the real query, from the context
    statistics S⁰ (`eqicl._fast.layer_weights`: the compiled kernel or XLA, the same choice
    as training makes); the token equation gives the same weights to round-off. A layer
    class whose `__call__` is its own (`statistics_exact` false) runs on the tokens: the
    basis vectors as queries give w^l (ŷ is linear in the query), then the real query."""
    if not model.statistics_exact:

        def one(x1, y1, q1):
            d = x1.shape[-1]
            queries = jnp.concatenate([jnp.eye(d, dtype=x1.dtype), q1[None]], axis=0)
            preds = model(x1, y1, queries)
            return preds[:, :d], preds[:, d]

        return jax.vmap(one)(x, y, xq)
    w = layer_weights(model, context_stats(x, y))  # (layers, d, batch)
    w = jnp.transpose(w, (2, 0, 1))  # (batch, layers, d)
    return w, jnp.einsum("bld,bd->bl", w, xq)


@eqx.filter_jit
def model_exact_losses(
    model: LinearTransformer, batch, sp: Spectral
) -> Float[Array, "batch layers"]:
    """Exact adjusted loss ½‖w^l − μ‖² after every layer."""
    w, _ = model_weights_and_predictions(model, batch.x, batch.y, batch.xq)
    coords = jax.vmap(sp.to_coords, in_axes=1, out_axes=0)(w)  # (layers, batch, d)
    return exact_loss(sp, coords).T


def _layer_losses(model, batch, sp):
    w, preds = model_weights_and_predictions(model, batch.x, batch.y, batch.xq)
    coords = jax.vmap(sp.to_coords, in_axes=1, out_axes=0)(w)
    exact = exact_loss(sp, coords)  # (layers, batch)
    orc = jnp.sum(sp.oracle * sp.q, axis=-1)
    unadjusted = 0.5 * (preds.T - sp.yq[None]) ** 2
    sampled = unadjusted - 0.5 * (orc - sp.yq)[None] ** 2
    return exact, sampled, unadjusted


def _baseline_losses(tuned: TunedBaselines, sp: Spectral):
    out = {}
    for name, coords in tuned.coords(sp).items():
        pred = jnp.sum(coords * sp.q, axis=-1)
        out[name] = (exact_loss(sp, coords), sampled_loss(sp, coords), 0.5 * (pred - sp.yq) ** 2)
    return out


@eqx.filter_jit
def _chunk_losses(
    model: LinearTransformer | None, tuned: TunedBaselines | None, batch, sp: Spectral | None = None
) -> dict:
    """Every per-sequence loss of one chunk of test sequences, in one compiled program
    (`sp`: the chunk's eigen-decomposition, if already computed)."""
    if sp is None:
        sp = typing.cast(Spectral, spectral(batch))  # jax.jit's wrapper is typed to return Any
    out: dict = {"oracle_trace": posterior_trace(sp)}
    if model is not None:
        out["model"] = _layer_losses(model, batch, sp)
    if tuned is not None:
        out["baselines"] = _baseline_losses(tuned, sp)
    return out


_spectral = jax.jit(spectral)


class SequenceCache:
    """Test sequences drawn by evaluations, with their eigen-decompositions, kept so that
    more models are scored on them without drawing and decomposing them again (the sweep
    scores 21 models per noise setting on the same sequences; that work is most of an
    evaluation). Pass one to `evaluate` (or `eqicl.run`) for every model to score on the
    same draw. It holds one task and evaluation setting at a time: asked for another, it
    lets go of the first."""

    def __init__(self):
        self._setting = None
        self._held: dict[tuple[str, int], tuple] = {}

    def get(self, config: Config, part: str, index: int, dtype, draw: Callable[[], Batch]):
        """(batch, its Spectral): chunk `index` of `part` for `config`, `draw()`n the first
        time it is asked for."""
        setting = (config.task, config.eval, jnp.dtype(dtype).name)
        if setting != self._setting:
            self._setting, self._held = setting, {}
        if (part, index) not in self._held:
            batch = draw()
            self._held[(part, index)] = (batch, _spectral(batch))
        return self._held[(part, index)]


def _test_data(
    config: Config,
    part: str,
    index: int,
    key,
    size: int,
    dt,
    sigma=None,
    cache: SequenceCache | None = None,
):
    """(batch, its Spectral or None): test sequences `index` of `part` ("test" or "profile")."""

    def draw():
        if sigma is None:
            return sample_batch(key, config.task, size, dt)
        return sample_batch(key, config.task, size, dt, sigma=jnp.full((size,), sigma, dt))

    if cache is None:
        return draw(), None
    return cache.get(config, part, index, dt, draw)


def eval_keys(config: Config) -> dict[str, PRNGKeyArray]:
    """The evaluation's keys, by use, all from `eval.seed`: baseline tuning, the test
    sequences, the per-variance profile, the selection's proposal draw, the tail-aware
    estimate and the selection's plain validation draw. Everything that scores on one of these draws takes its key here."""
    base = prng_key(config.eval.seed)
    return {
        name: jr.fold_in(base, i)
        # 4 is the polish stage's fixed sample (eqicl._sweep).
        for name, i in (
            ("tune", 0),
            ("test", 1),
            ("profile", 2),
            ("select", 3),
            ("tail", 5),
            ("validation", 6),
        )
    }


def tune(config: Config) -> TunedBaselines:
    """Baselines tuned on `eval.tune_sequences` sequences kept apart from the test ones."""
    dt = eval_dtype()
    sp = spectral(
        sample_batch(eval_keys(config)["tune"], config.task, config.eval.tune_sequences, dt)
    )
    return tune_baselines(sp, gd_steps=config.model.layers)


def select_estimates(models: LinearTransformer, config: Config) -> list[dict]:
    """The validation estimate of every ensemble member (stacked models): its expected exact
    adjusted loss after the last layer on `train.select_sequences` held-out plain sequences
    (the law the table reports), as an `eqicl.summarize` dict (mean, se, max, top_share, ...),
    with under "tail" the same estimate on as many sequences drawn from the selection's
    proposal (`train.select_proposal_*`, reaching beyond a plain draw) and importance-weighted.
    The two draws are held out from training, tuning and every test seed."""
    members = {str(i): ensemble_member(models, i) for i in range(_num_members(models))}
    keys = eval_keys(config)
    n = max(config.train.select_sequences, 2)
    chunk = config.eval.chunk
    plain = estimate_all(members, config.task, keys["validation"], n, PLAIN, chunk=chunk)
    proposal = config.train.select_proposal
    tail = (
        plain
        if proposal.plain
        else estimate_all(members, config.task, keys["select"], n, proposal, chunk=chunk)
    )
    return [{**plain[str(i)][-1], "tail": tail[str(i)][-1]} for i in range(len(members))]


# The table's test estimates rest on this many sequences: a validation standard error is
# judged as it would be on them (the bar: at most 5 % of the mean, or 0.0002).
TABLE_SEQUENCES = 1_000_000

# Ranks of a validation estimate (`verdict`): every choice takes the lowest rank first.
SOUND, TAIL, UNSOUND = 0, 1, 2


def _plain_fault(estimate: dict) -> str | None:
    """Why an estimate (an `eqicl.summarize` dict) is not one the table could report: not
    finite, carried (the top 0.1 % carries at least half the mean and the largest loss is at
    least 0.5, as `analysis.reeval` judges a test estimate) or imprecise (its standard error,
    scaled to `TABLE_SEQUENCES` sequences, above 5 % of the mean and above 0.0002)."""
    mean, se = float(estimate["mean"]), float(estimate["se"])
    if not (estimate["finite"] and math.isfinite(mean)):
        return "not finite"
    if estimate["top_share"] >= 0.5 and estimate["max"] >= 0.5:
        return (
            f"the top 0.1 % carries {estimate['top_share']:.0%} of {mean:.4g}, largest loss "
            f"{estimate['max']:.3g}"
        )
    projected = se * math.sqrt(estimate["sequences"] / TABLE_SEQUENCES)
    if not projected <= max(0.05 * mean, 2e-4):
        return (
            f"imprecise: {mean:.4g} ± {se:.2g} on {estimate['sequences']} sequences "
            f"({projected:.2g} on {TABLE_SEQUENCES})"
        )
    return None


def verdict(estimate: dict) -> tuple[int, str | None]:
    """How every choice between candidates ranks a validation estimate (`select_estimates`),
    with why: `UNSOUND` if the plain draw's estimate is not finite, carried or imprecise
    (`_plain_fault`: what the table's bar refuses); `TAIL` if it is sound but the proposal's
    importance-weighted estimate (under "tail") is itself not finite, carried or imprecise,
    or exceeds the plain one by more than 10 % plus two standard errors of the difference:
    sequences just beyond a plain draw's reach carry its expectation; `SOUND` otherwise
    (reason None)."""
    fault = _plain_fault(estimate)
    if fault is not None:
        return UNSOUND, f"on the plain validation draw: {fault}"
    tail = estimate.get("tail")
    if tail is None:
        return SOUND, None
    fault = _plain_fault(tail)
    if fault is not None:
        return TAIL, f"on the proposal's validation draw: {fault}"
    mean, se = float(estimate["mean"]), float(estimate["se"])
    t_mean, t_se = float(tail["mean"]), float(tail["se"])
    if t_mean - mean > 0.1 * mean + 2 * math.hypot(se, t_se):
        return TAIL, (
            f"the proposal's validation draw gives {t_mean:.4g} ± {t_se:.2g} against "
            f"{mean:.4g} ± {se:.2g} plain: rare sequences carry its expectation"
        )
    return SOUND, None


def unsound(estimate: dict) -> str | None:
    """Why a validation estimate is not `SOUND` (`verdict`), or None if it is."""
    return verdict(estimate)[1]


# A candidate whose expectation rare sequences carry (`TAIL`) must beat a sound one by more
# than the bar's relative margin (Table 1 holds a cell within 10 % of the paper): its plain
# validation mean is ranked as if 10 % higher.
TAIL_MARGIN = 1.1


def rank_key(rank: int, mean: float) -> tuple[bool, float]:
    """How every choice ranks a candidate of `verdict` rank `rank` and plain validation mean
    `mean`: unsound ones last; among the others the lower mean, a `TAIL` one's raised by
    `TAIL_MARGIN`; non-finite: (True, inf)."""
    if not math.isfinite(mean):
        return True, math.inf
    return rank == UNSOUND, mean * (TAIL_MARGIN if rank == TAIL else 1.0)


def selection_keys(estimates: list[dict]) -> list[tuple[bool, float]]:
    """How every choice between candidates ranks them (seeds, starts, polish, passes):
    `rank_key` of each validation estimate's `verdict` and plain mean. A candidate that is
    carried or imprecise on the plain draw never wins over one that is not; one that only
    the proposal's draw finds carried wins over a sound one only by more than 10 %."""
    return [rank_key(verdict(e)[0], float(e["mean"])) for e in estimates]


def _brief(e: dict) -> dict[str, float]:
    return {k: float(e[k]) for k in ("mean", "se", "max", "top_share")}


def selection_record(estimates: list[dict]) -> dict:
    """The part of a record's `selection` that says how its candidates ranked: the plain
    validation `losses`, `rank` (`verdict`), `sound` (rank `SOUND`), the reason of each
    rank above it (`why`, None if sound) and each estimate's mean, se, largest loss and
    top-0.1 % share on both draws (`validation`: {"plain", "tail"})."""
    verdicts = [verdict(e) for e in estimates]
    return {
        "losses": [float(e["mean"]) if math.isfinite(e["mean"]) else math.inf for e in estimates],
        "rank": [r for r, _ in verdicts],
        "sound": [r == SOUND for r, _ in verdicts],
        "why": [why for _, why in verdicts],
        "validation": [
            {"plain": _brief(e), **({"tail": _brief(e["tail"])} if "tail" in e else {})}
            for e in estimates
        ],
    }


def _num_members(models) -> int:
    return jax.tree.leaves(eqx.filter(models, eqx.is_array))[0].shape[0]


def ensemble_member(models, i: int):
    """Member `i` of a stacked ensemble (a model or a training state with a leading axis)."""
    dynamic, static = eqx.partition(models, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda a: a[i], dynamic), static)


def profile_sigmas(task: TaskConfig, points: int, factor: float) -> np.ndarray:
    """The per-variance profile's grid: `points` values of σ from 0 to `factor` times the top
    of the task's training range (to 1 for a noiseless task)."""
    top = task.sigma_range * factor if task.sigma_range > 0 else 1.0
    return np.linspace(0.0, top, points)


def evaluate(
    model: LinearTransformer | None,
    config: Config,
    progress: Callable[[str], None] | None = None,
    baselines: bool = True,
    test_cache: SequenceCache | None = None,
) -> dict:
    """Everything eval.json holds: the model's adjusted loss (exact and sampled estimator, with
    standard errors) after every layer, its unadjusted loss, the baselines on the same
    sequences (unless `baselines=False`: a sweep scores them once per noise setting),
    per-variance profiles, and the paper's numbers for this cell. With `test_cache`,
    the test sequences come from (and go into) that cache; the numbers are the same."""
    dt = eval_dtype()
    model = cast(model, dt) if model is not None else None
    keys = eval_keys(config)
    say = progress or (lambda _: None)
    tuned = None
    if baselines:
        say("tuning baselines")
        tuned = tune(config)

    ec = config.eval
    chunks = [ec.chunk] * (ec.sequences // ec.chunk) + (
        [ec.sequences % ec.chunk] if ec.sequences % ec.chunk else []
    )
    acc: dict[str, list] = {}
    for i, size in enumerate(chunks):
        say(f"test sequences {sum(chunks[:i])}/{ec.sequences}")
        batch, sp = _test_data(
            config, "test", i, jr.fold_in(keys["test"], i), size, dt, cache=test_cache
        )
        out = jax.device_get(_chunk_losses(model, tuned, batch, sp))
        if model is not None:
            exact, sampled, unadj = out["model"]
            acc.setdefault("exact", []).append(exact)
            acc.setdefault("sampled", []).append(sampled)
            acc.setdefault("unadjusted", []).append(unadj)
        acc.setdefault("oracle_trace", []).append(out["oracle_trace"])
        for name, losses in out.get("baselines", {}).items():
            acc.setdefault(name, []).append(losses)
    oracle_trace = np.concatenate(acc.pop("oracle_trace"))

    def summary(ex, sa, un):
        return {
            "adjusted_exact": mean_se(ex),
            "adjusted_sampled": mean_se(sa),
            "unadjusted": mean_se(un),
        }

    result: dict = {"sequences": ec.sequences, "dtype": jnp.dtype(dt).name}
    if model is not None:
        exact = np.concatenate(acc.pop("exact"), axis=1)
        sampled = np.concatenate(acc.pop("sampled"), axis=1)
        unadj = np.concatenate(acc.pop("unadjusted"), axis=1)
        say(f"tail-aware estimate ({ec.tail_sequences} sequences)")
        tail = estimate(model, config.task, keys["tail"], ec.tail_sequences, ec.proposal, ec.chunk)
        result["model"] = {
            "finite": bool(np.all(np.isfinite(exact)) and np.all(np.isfinite(sampled))),
            **summary(exact[-1], sampled[-1], unadj[-1]),
            # The plain test draw's tail (largest loss, top 0.1 % share) and the tail-aware
            # estimate of the same expectation on its own sequences (SPEC §9).
            "exact_tail": summarize(exact[-1]),
            "tail": tail[-1],
            "after_layer": [
                {"layer": k + 1, **summary(exact[k], sampled[k], unadj[k])}
                for k in range(exact.shape[0])
            ],
        }
    result["baselines"] = {
        name: summary(*(np.concatenate([c[j] for c in chunks_]) for j in range(3)))
        for name, chunks_ in acc.items()
    }
    result["oracle_expected_unadjusted"] = mean_se(oracle_trace)
    result["baseline_params"] = dataclasses.asdict(tuned) if tuned is not None else None
    say("per-variance profile")
    result["profile"] = profile(model, config, tuned, test_cache)
    result["paper"] = {"model": paper_value(config), **paper_baselines(config.task)}
    return result


def profile(
    model: LinearTransformer | None,
    config: Config,
    tuned: TunedBaselines | None,
    test_cache: SequenceCache | None = None,
) -> dict:
    """Exact adjusted loss (every layer and every baseline, with standard errors) and the
    oracle's expected unadjusted loss at fixed σ on a grid reaching beyond the training range
    (its sequences from and into `test_cache`, if given)."""
    dt = eval_dtype()
    ec = config.eval
    sigmas = profile_sigmas(config.task, ec.profile_points, ec.profile_factor)
    out: dict = {
        "sigma": sigmas.tolist(),
        "sequences": ec.profile_sequences,
        "model": [],
        "model_se": [],
        "baselines": {},
        "baselines_se": {},
        "oracle_unadjusted": [],
    }
    root_n = math.sqrt(ec.profile_sequences)
    key = eval_keys(config)["profile"]
    for i, s in enumerate(sigmas):
        batch, sp = _test_data(
            config,
            "profile",
            i,
            jr.fold_in(key, i),
            ec.profile_sequences,
            dt,
            sigma=float(s),
            cache=test_cache,
        )
        point = jax.device_get(_chunk_losses(model, tuned, batch, sp))
        if model is not None:
            losses = point["model"][0].T  # exact estimator, (sequences, layers)
            out["model"].append(losses.mean(axis=0).tolist())
            out["model_se"].append((losses.std(axis=0, ddof=1) / root_n).tolist())
        out["oracle_unadjusted"].append(float(point["oracle_trace"].mean()))
        for name, (losses, _, _) in point.get("baselines", {}).items():
            out["baselines"].setdefault(name, []).append(float(losses.mean()))
            out["baselines_se"].setdefault(name, []).append(float(losses.std(ddof=1) / root_n))
    return out


def evaluate_baselines(
    config: Config,
    progress: Callable[[str], None] | None = None,
    test_cache: SequenceCache | None = None,
) -> dict:
    """The baselines alone, on the same test sequences as `evaluate` (same keys)."""
    return evaluate(None, config, progress, baselines=True, test_cache=test_cache)


# ---------------------------------------------------------------------------------------------
# Estimates of the expectation that see the tail (SPEC §9, eqicl._tail).


@eqx.filter_jit
def stats_exact_losses(model: LinearTransformer, st: Stats) -> Float[Array, "layers batch"]:
    """Exact adjusted loss ½‖wˡ − μ‖² after every layer, from the statistics (the compiled
    kernel where it applies, XLA elsewhere)."""
    w = layer_weights(model, st.s)  # (layers, d, batch)
    mu = posterior_mean(st)
    return 0.5 * jnp.sum((w - mu[None]) ** 2, axis=1)


@eqx.filter_jit
def _draw_weighted(task: TaskConfig, key, size: int, proposal: Proposal, dtype):
    return sample_weighted_stats(key, task, size, proposal, dtype)


@eqx.filter_jit
def _draw_weighted_batch(task: TaskConfig, key, size: int, proposal: Proposal, dtype):
    return sample_weighted_batch(key, task, size, proposal, dtype)


def estimate(
    model: LinearTransformer,
    task: TaskConfig,
    key: PRNGKeyArray,
    sequences: int,
    proposal: Proposal = DEFAULT,
    chunk: int = 50_000,
    progress: Callable[[int], object] | None = None,
) -> list[dict]:
    """The model's expected exact adjusted loss after every layer, estimated on `sequences`
    sequences drawn from `proposal` (`eqicl.PLAIN`: plain sampling) and importance-weighted,
    in the evaluation dtype: one `eqicl.summarize` dict per layer (mean, se, max, top_share,
    ess, ...). Chunk i of `chunk` sequences is drawn with `fold_in(key, i)`, so the draw is
    fixed by (key, sequences, chunk, proposal) and every model scored with the same
    arguments sees the same sequences. `progress(done)` after every chunk."""
    return estimate_all({"model": model}, task, key, sequences, proposal, chunk, progress)["model"]


def estimate_all(
    models: dict[str, LinearTransformer],
    task: TaskConfig,
    key: PRNGKeyArray,
    sequences: int,
    proposal: Proposal = DEFAULT,
    chunk: int = 50_000,
    progress: Callable[[int], object] | None = None,
) -> dict[str, list[dict]]:
    """`estimate` for several models on the same sequences, each chunk drawn once."""
    if sequences < 2:
        raise ValueError(f"an estimate needs at least 2 sequences, got {sequences}")
    dt = eval_dtype()
    cast_models = {name: cast(m, dt) for name, m in models.items()}
    # A layer class the statistics formulation does not compute: every model on tokens.
    tokens = not all(m.statistics_exact for m in models.values())
    losses: dict[str, list] = {name: [] for name in models}
    log_ws = []
    done = 0
    for i in range(math.ceil(sequences / chunk)):
        size = min(chunk, sequences - done)
        if tokens:
            batch, log_w = _draw_weighted_batch(task, jr.fold_in(key, i), size, proposal, dt)
            sp = _spectral(batch)
        else:
            st, log_w = _draw_weighted(task, jr.fold_in(key, i), size, proposal, dt)
        for name, m in cast_models.items():
            ell = model_exact_losses(m, batch, sp).T if tokens else stats_exact_losses(m, st)
            losses[name].append(np.asarray(jax.device_get(ell)))
        log_ws.append(np.asarray(jax.device_get(log_w)))
        done += size
        if progress is not None:
            progress(done)
    log_w = None if proposal.plain else np.concatenate(log_ws)
    out = {}
    for name, parts in losses.items():
        ell = np.concatenate(parts, axis=1)
        out[name] = [summarize(ell[k], log_w) for k in range(ell.shape[0])]
    return out
