"""A layer class of the user's own, defined outside the package as a researcher would: a DIAG
layer whose query update is scaled by a learned g. Its `__call__` is its own, so the
statistics formulation (and the CPU kernel), which read only `operator()`, would score it as
plain DIAG. Every public entry point must compute what the model computes (the token
equation) or refuse in one line."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jaxtyping import Array, Float

import analysis
import eqicl

F64 = jnp.float64
TASK = eqicl.TaskConfig(d=4, n=9, sigma_max=1.0)


class ScaledQuery(eqicl.AbstractDiagAttention, strict=True):
    """DIAG whose update of the query tokens (not the context) is multiplied by g."""

    kind: ClassVar[str] = "scaled-query"
    label: ClassVar[str] = "DIAG-g"
    fields: ClassVar[tuple[str, ...]] = ("p", "q", "g")
    embeds: ClassVar[tuple[str, ...]] = ("scaled-query",)

    p: Float[Array, "heads 2"]
    q: Float[Array, "heads 2"]
    g: Float[Array, ""]
    dim: int = eqx.field(static=True)
    scale_n: float = eqx.field(static=True, default=1.0)
    scale_s: float = eqx.field(static=True, default=1.0)

    def head_scalars(self):
        return jnp.stack([self.p[:, 0], self.p[:, 1], self.q[:, 0], self.q[:, 1]])

    @classmethod
    def init_arrays(cls, key, heads, d, scale, gd, dtype):
        raise NotImplementedError

    def __call__(self, tokens, n):
        t = self.operator(eqicl.context_statistics(tokens, n))
        factor = jnp.where(jnp.arange(tokens.shape[0]) < n, 1.0, self.g).astype(tokens.dtype)
        return tokens + factor[:, None] * (tokens @ t.T)


def _models():
    """The custom model (g = 0.5, 0.7, 0.9) and plain DIAG with the same p and q."""
    diag = eqicl.init_transformer(
        jr.key(0), eqicl.ModelConfig(kind="diag", layers=3, init_scale=0.05), TASK, F64
    )
    layers = diag.layers
    custom = ScaledQuery(
        p=layers.p, q=layers.q, g=jnp.asarray([0.5, 0.7, 0.9], F64), dim=layers.dim
    )
    return eqicl.LinearTransformer(layers=custom, num_layers=3), diag


def _token_exact_losses(model, batch):
    """½‖wˡ − μ‖² from the token equation alone: wˡ by querying the basis vectors."""
    w = jax.vmap(model.implicit_weights)(batch.x, batch.y)  # (batch, layers, d)
    mu = jax.vmap(eqicl.oracle_weights)(batch.x, batch.y, batch.sigma)  # (batch, d)
    return 0.5 * jnp.sum((w - mu[:, None]) ** 2, axis=-1)


def test_the_class_says_its_statistics_map_is_unknown():
    custom, diag = _models()
    assert not custom.statistics_exact and diag.statistics_exact


def test_exact_losses_and_evaluation_follow_the_token_equation():
    custom, diag = _models()
    batch = eqicl.sample_batch(jr.key(1), TASK, 64, F64)
    want = _token_exact_losses(custom, batch)
    sp = eqicl.spectral(batch)
    got = eqicl.model_exact_losses(custom, batch, sp)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
    plain = eqicl.model_exact_losses(diag, batch, sp)
    assert np.max(np.abs(np.asarray(plain - got))) > 1e-3  # g matters: not scored as DIAG
    scored = eqicl.score(custom, batch)  # the model and the baselines in one call
    np.testing.assert_allclose(
        [m["mean"] for m in scored["model"]], np.mean(np.asarray(want), axis=0), rtol=1e-10
    )
    w, pred = eqicl.model_weights_and_predictions(custom, batch.x, batch.y, batch.xq)
    np.testing.assert_allclose(pred[:, -1], jax.vmap(custom.predict)(batch.x, batch.y, batch.xq))

    config = eqicl.Config(task=TASK, model=eqicl.ModelConfig(kind="diag", layers=3))
    small = eqicl.override(
        config,
        [
            "eval.sequences=400",
            "eval.chunk=400",
            "eval.tune_sequences=400",
            "eval.profile_points=2",
            "eval.profile_sequences=50",
            "eval.tail_sequences=400",
        ],
    )
    result = eqicl.evaluate(custom, small, baselines=False)
    reference = eqicl.evaluate(diag, small, baselines=False)
    ours = result["model"]["adjusted_exact"]["mean"]
    assert abs(ours - reference["model"]["adjusted_exact"]["mean"]) > 1e-3
    # The tail-aware estimate runs on tokens too: the same expectation, other sequences.
    tail = result["model"]["tail"]
    assert tail["finite"] and abs(tail["mean"] - ours) < 5 * (tail["se"] + 1e-3)


def test_the_tail_aware_estimate_on_tokens_is_the_token_equation():
    custom, _ = _models()
    key = jr.key(3)
    [est] = [eqicl.estimate(custom, TASK, key, 300, eqicl.PLAIN, chunk=300)[-1]]
    batch = eqicl.sample_batch(jr.fold_in(key, 0), TASK, 300, F64)
    want = _token_exact_losses(custom, batch)[:, -1]
    np.testing.assert_allclose(est["mean"], float(jnp.mean(want)), rtol=1e-10)


def test_training_loss_on_tokens_and_a_clear_refusal_on_statistics():
    custom, _ = _models()
    batch = eqicl.sample_batch(jr.key(4), TASK, 32, F64)
    tokens = eqicl.TrainConfig(formulation="tokens", objective="sampled", loss_clip=0.0)
    got = eqicl.loss_fn(custom, batch, tokens)
    pred = jax.vmap(custom.predict)(batch.x, batch.y, batch.xq)
    np.testing.assert_allclose(got, jnp.mean(0.5 * (pred - batch.yq) ** 2), rtol=1e-12)
    from eqicl._fast import stats_from_batch

    with pytest.raises(eqicl.UnknownLayer, match=r"^.*ScaledQuery overrides __call__"):
        eqicl.loss_fn(custom, stats_from_batch(batch), eqicl.TrainConfig(formulation="stats"))


def test_analysis_refuses_a_layer_it_cannot_read():
    custom, _ = _models()
    batch = eqicl.sample_batch(jr.key(5), TASK, 1, F64)
    with pytest.raises(eqicl.UnknownLayer, match="theorem41_terms"):
        analysis.theorem41_terms(custom, batch.x[0], batch.y[0])


def test_weights_round_trip_with_the_users_class(tmp_path):
    custom, _ = _models()
    path = tmp_path / "custom.npz"
    eqicl.save_weights(custom, path)
    back, meta = eqicl.load_weights(path, layer_class=ScaledQuery)
    assert meta["kind"] == "scaled-query" and isinstance(back.layers, ScaledQuery)
    for name in ScaledQuery.fields:
        np.testing.assert_array_equal(getattr(back.layers, name), getattr(custom.layers, name))
    with pytest.raises(eqicl.WeightsError, match="pass its layer class"):
        eqicl.load_weights(path)
    with pytest.raises(eqicl.WeightsError, match="not a 'diag' one"):
        eqicl.load_weights(path, layer_class=eqicl.DiagAttention)


@pytest.fixture
def registry(monkeypatch):
    """eqicl's registry of layer classes as it is now, restored after the test."""
    from eqicl import _model

    monkeypatch.setattr(_model, "_REGISTERED", dict(_model._REGISTERED))


class _Fresh(eqicl.AbstractDiagAttention, strict=True):
    """A DIAG layer under a kind of its own (DIAG's arrays, `operator` the whole layer)."""

    kind: ClassVar[str] = "fresh-diag"
    label: ClassVar[str] = "DIAG (fresh)"
    fields: ClassVar[tuple[str, ...]] = ("p", "q")
    embeds: ClassVar[tuple[str, ...]] = ("diag", "fresh-diag")

    p: Float[Array, "heads 2"]
    q: Float[Array, "heads 2"]
    dim: int = eqx.field(static=True)
    scale_n: float = eqx.field(static=True, default=1.0)
    scale_s: float = eqx.field(static=True, default=1.0)

    def head_scalars(self):
        return jnp.stack([self.p[:, 0], self.p[:, 1], self.q[:, 0], self.q[:, 1]])

    @classmethod
    def init_arrays(cls, key, heads, d, scale, gd, dtype):
        return eqicl.DiagAttention.init_arrays(key, heads, d, scale, gd, dtype)

    @classmethod
    def embed(cls, source, key, noise, dtype):  # DIAG's arrays are its own
        return {n: a.astype(dtype) for n, a in source.arrays().items()}


def test_a_registered_kind_is_a_config_a_run_and_a_weights_file(registry, tmp_path):
    """Before registering: a config naming the kind is a one-line ConfigError, a weights file
    of it needs its class. After: the config (and config.json) takes it, eqicl.run trains and
    resumes it, its weights load without the class, and a warm start takes DIAG's weights
    (its `embeds`) as the same function."""
    with pytest.raises(eqicl.ConfigError, match=r"^model.kind must be one of .*register_layer"):
        eqicl.ModelConfig(kind="fresh-diag")
    assert eqicl.register_layer(_Fresh) is _Fresh
    assert eqicl.register_layer(_Fresh) is _Fresh  # again: a no-op
    assert eqicl.layer_class("fresh-diag") is _Fresh and "fresh-diag" in eqicl.layer_classes()

    data = eqicl.preset("tiny", ["train.steps=20", "train.checkpoint_every=10"]).to_dict()
    config = eqicl.Config.from_dict({**data, "model": {**data["model"], "kind": "fresh-diag"}})
    run_dir = tmp_path / "run"
    eqicl.run(config, run_dir, progress=False, echo=lambda _: None, evaluate=False)
    assert eqicl.read_run_config(run_dir).model.kind == "fresh-diag"
    lines = []  # again: config.json read back, the step-20 checkpoint restored, no step taken
    eqicl.run(config, run_dir, progress=False, echo=lines.append, evaluate=False)
    state = eqicl.restore_checkpoint(run_dir, config)
    assert state is not None and int(state.step[0]) == 20
    trained = eqicl.ensemble_member(state.model, 0)
    assert type(trained.layers) is _Fresh

    path = tmp_path / "fresh.npz"
    eqicl.save_weights(trained, path)
    loaded, meta = eqicl.load_weights(path)  # no layer_class: the kind is registered
    assert meta["kind"] == "fresh-diag" and type(loaded.layers) is _Fresh
    np.testing.assert_array_equal(loaded.layers.p, trained.layers.p)

    diag = eqicl.init_transformer(
        jr.key(3), eqicl.ModelConfig(kind="diag", layers=2, init_scale=0.3), TASK, F64
    )
    eqicl.save_weights(diag, tmp_path / "diag.npz")
    start = eqicl.ModelConfig(kind="fresh-diag", layers=2, init_from=str(tmp_path / "diag.npz"))
    warm = eqicl.warm_transformer(jr.key(0), start, TASK, F64)
    batch = eqicl.sample_batch(jr.key(1), TASK, 16, F64)
    np.testing.assert_allclose(
        jax.vmap(warm.predict)(batch.x, batch.y, batch.xq),
        jax.vmap(diag.predict)(batch.x, batch.y, batch.xq),
        rtol=1e-12,
    )


def test_registering_what_is_not_a_new_layer_class_is_one_line(registry):
    class Clash(_Fresh, strict=True):  # noqa: D101
        kind: ClassVar[str] = "diag"

    class SameLabel(_Fresh, strict=True):  # noqa: D101
        kind: ClassVar[str] = "fresh-diag-2"
        label: ClassVar[str] = "DIAG"

    for cls, message in (
        (int, "takes a layer class"),
        (eqicl.AbstractDiagAttention, "not a concrete layer class"),
        (Clash, "the kind 'diag' is DiagAttention's, not Clash's"),
        (SameLabel, "the label 'DIAG' is the 'diag' kind's"),
    ):
        with pytest.raises(eqicl.ConfigError, match=message) as e:
            eqicl.register_layer(cls)
        assert "\n" not in str(e.value)
    assert "fresh-diag-2" not in eqicl.layer_classes()
