import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqicl
from eqicl import DiagAttention, FullAttention, GDPPAttention, LinearTransformer

F64 = jnp.float64


def _data(key, d=5, n=12, m=3, sigma=0.7):
    task = eqicl.TaskConfig(d=d, n=n, noise="fixed", sigma=sigma)
    b = eqicl.sample_batch(key, task, m, F64)
    return b.x[0], b.y[0], b.xq


def _stack(layers):
    """Stack single layers (same class and statics) into a LinearTransformer."""
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    return LinearTransformer(layers=stacked, num_layers=len(layers))


def _numpy_forward(ps, qs, x, y, xq):
    """SPEC §2 written directly: e_i ← e_i + Σ_k P_k (Σ_{j≤n} e_j e_jᵀ) Q_k e_i."""
    n = x.shape[0]
    e = np.concatenate([np.c_[x, y], np.c_[xq, np.zeros(len(xq))]])
    preds = []
    for p, q in zip(ps, qs, strict=True):
        s = sum(np.outer(e[j], e[j]) for j in range(n))
        t = sum(p[k] @ s @ q[k] for k in range(p.shape[0]))
        e = e + e @ t.T
        preds.append(-e[n:, -1])
    return np.array(preds)


def test_full_matches_token_equation():
    k1, k2, k3 = jr.split(jr.key(0), 3)
    x, y, xq = _data(k1)
    L, h, D = 3, 2, x.shape[1] + 1
    ps = 0.05 * jr.normal(k2, (L, h, D, D), F64)
    qs = 0.05 * jr.normal(k3, (L, h, D, D), F64)
    model = _stack([FullAttention(p=ps[i], q=qs[i]) for i in range(L)])
    got = model(x, y, xq)
    want = _numpy_forward(
        np.asarray(ps), np.asarray(qs), np.asarray(x), np.asarray(y), np.asarray(xq)
    )
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_gd_construction_reproduces_gd_steps():
    """P = −η e_y e_yᵀ, Q = diag(I, 0) in every layer: layer l's prediction is the l-th
    GD iterate on ½Σ(y_i − <w, x_i>)² from w = 0, evaluated at the query."""
    x, y, xq = _data(jr.key(1))
    d, eta, L = x.shape[1], 0.03, 4
    p = jnp.zeros((1, d + 1, d + 1), F64).at[0, d, d].set(-eta)
    q = jnp.zeros((1, d + 1, d + 1), F64).at[0, :d, :d].set(jnp.eye(d, dtype=F64))
    model = _stack([FullAttention(p=p, q=q)] * L)
    w = np.zeros(d)
    xn, yn = np.asarray(x), np.asarray(y)
    want = []
    for _ in range(L):
        w = w + eta * xn.T @ (yn - xn @ w)
        want.append(np.asarray(xq) @ w)
    np.testing.assert_allclose(model(x, y, xq), np.array(want), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model.implicit_weights(x, y)[-1], w, rtol=1e-12, atol=1e-12)


def _random_diag(key, d, heads, scale_n=1.0, scale_s=1.0):
    kp, kq = jr.split(key)
    return DiagAttention(
        p=0.1 * jr.normal(kp, (heads, 2), F64),
        q=0.1 * jr.normal(kq, (heads, 2), F64),
        dim=d,
        scale_n=scale_n,
        scale_s=scale_s,
    )


def test_diag_layer_is_the_spec_update():
    x, y, xq = _data(jr.key(2))
    layer = _random_diag(jr.key(3), x.shape[1], heads=3)
    wxx, wxy, wyx, wyy = np.asarray(layer.coefficients())
    xn, yn = np.asarray(x), np.asarray(y)
    sig, alpha, lam = xn.T @ xn, xn.T @ yn, yn @ yn
    want_x = xn + wxx * xn @ sig.T + wxy * yn[:, None] * alpha[None, :]
    want_y = yn + wyx * xn @ alpha + wyy * lam * yn
    e = jnp.concatenate([x, y[:, None]], axis=1)
    got = layer(e, x.shape[0])
    np.testing.assert_allclose(got[:, :-1], want_x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[:, -1], want_y, rtol=1e-12, atol=1e-12)


def test_diag_equals_full_with_diagonal_structure():
    x, y, xq = _data(jr.key(4))
    d = x.shape[1]
    diags = [_random_diag(k, d, heads=2, scale_n=12.0, scale_s=3.0) for k in jr.split(jr.key(5), 3)]
    fulls = [FullAttention(p=pq[0], q=pq[1]) for pq in (layer.pq() for layer in diags)]
    got, want = _stack(diags)(x, y, xq), _stack(fulls)(x, y, xq)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    raw_p, raw_q = diags[0].raw_pq()
    assert jnp.all(raw_p[:, :d, :d] == raw_p[:, :1, :1] * jnp.eye(d, dtype=F64)[None])


def test_gdpp_equals_diag_with_zero_qy():
    x, y, xq = _data(jr.key(6))
    d = x.shape[1]
    diags = [_random_diag(k, d, heads=2) for k in jr.split(jr.key(7), 3)]
    diags = [eqx.tree_at(lambda m: m.q, m, m.q.at[:, 1].set(0.0)) for m in diags]
    gdpps = [GDPPAttention(p=m.p, q_x=m.q[:, 0], dim=d) for m in diags]
    np.testing.assert_allclose(
        _stack(gdpps)(x, y, xq), _stack(diags)(x, y, xq), rtol=1e-13, atol=1e-13
    )
    coeffs = _stack(gdpps).coefficients()
    assert jnp.all(coeffs[:, 1] == 0) and jnp.all(coeffs[:, 3] == 0)


def test_scaled_units_are_the_same_function_class():
    """A FULL layer in scaled units equals the paper-unit layer built from its pq()."""
    x, y, xq = _data(jr.key(8))
    D = x.shape[1] + 1
    kp, kq = jr.split(jr.key(9))
    scaled = FullAttention(
        p=0.1 * jr.normal(kp, (2, D, D), F64),
        q=0.1 * jr.normal(kq, (2, D, D), F64),
        scale_n=12.0,
        scale_s=2.5,
    )
    paper = FullAttention(*scaled.pq())
    np.testing.assert_allclose(_stack([scaled])(x, y, xq), _stack([paper])(x, y, xq), rtol=1e-12)


@pytest.mark.parametrize("kind", ["full", "diag", "gdpp"])
def test_prediction_is_linear_in_the_query(kind):
    """Queries never enter the context sums: ŷ = <w^L, x_t>, and queries do not interact."""
    task = eqicl.TaskConfig(d=4, n=9, sigma_max=1.0)
    model_cfg = eqicl.ModelConfig(kind=kind, layers=3, heads=2, init="normal", init_scale=0.1)
    model = eqicl.init_transformer(jr.key(10), model_cfg, task, F64)
    b = eqicl.sample_batch(jr.key(11), task, 5, F64)
    x, y = b.x[0], b.y[0]
    w = model.implicit_weights(x, y)
    preds = model(x, y, b.xq)
    np.testing.assert_allclose(preds, w @ b.xq.T, rtol=1e-11, atol=1e-12)
    alone = jnp.stack([model(x, y, b.xq[i : i + 1])[:, 0] for i in range(5)], axis=1)
    np.testing.assert_allclose(preds, alone, rtol=1e-12, atol=1e-13)


def test_gd_init_is_a_gd_step_in_paper_units():
    """init="gd" without noise: every layer's operator is T = [[0, 0], [−η αᵀ, 0]] with
    η = 1/(n s), for any context statistics S, in every parameterization."""
    task = eqicl.TaskConfig()
    D = task.d + 1
    stats = jr.normal(jr.key(1), (D, D), F64)
    stats = stats @ stats.T
    step = 1.0 / (task.n * (task.d + task.mean_sigma2) ** 0.5)
    want = jnp.zeros((D, D), F64).at[-1, :-1].set(-step * stats[-1, :-1])
    for kind in ("full", "diag", "gdpp"):
        for units in ("scaled", "paper"):
            cfg = eqicl.ModelConfig(kind=kind, layers=2, init="gd", init_scale=0.0, units=units)
            model = eqicl.init_transformer(jr.key(0), cfg, task, F64)
            got = eqx.filter_vmap(lambda layer: layer.operator(stats))(model.layers)
            np.testing.assert_allclose(got, jnp.stack([want, want]), rtol=1e-12, atol=1e-15)


def test_jaxtyping_checks_are_active():
    """The test run instruments eqicl with jaxtyping + beartype: a wrong shape is an error."""
    x = jnp.zeros((5, 3), F64)
    with pytest.raises(Exception, match="(?i)type-check|shape|dimension"):
        eqicl.statistics(x, jnp.zeros((4,), F64))


# --------------------------------------------------------------------------------------------
# Weights files and warm starts


def _trained_like(kind, layers, tmp_path, heads=1, sigma_max=3.0):
    """A random (init_scale 0.3, far from the GD start) model saved to a weights file."""
    config = eqicl.preset(
        "default",
        [
            f"model.kind={kind}",
            f"model.layers={layers}",
            f"model.heads={heads}",
            "model.init_scale=0.3",
            f"task.sigma_max={sigma_max}",
        ],
    )
    model = eqicl.init_transformer(jr.key(layers), config.model, config.task, F64)
    path = tmp_path / f"{kind}-{layers}.npz"
    eqicl.save_weights(model, path, select_loss=0.25)
    return model, path, config


def _warm(kind, layers, path, tmp_path, noise=0.0, sigma_max=3.0, heads=1):
    config = eqicl.preset(
        "default",
        [
            f"model.kind={kind}",
            f"model.layers={layers}",
            f"model.heads={heads}",
            f"model.init_scale={noise}",
            f"model.init_from={path}",
            f"task.sigma_max={sigma_max}",
        ],
    )
    return eqicl.init_transformer(jr.key(99), config.model, config.task, F64), config


def test_weights_file_round_trip(tmp_path):
    for kind in ("gdpp", "diag", "full"):
        model, path, _ = _trained_like(kind, 2, tmp_path, heads=2)
        loaded, meta = eqicl.load_weights(path)
        assert meta["select_loss"] == 0.25 and meta["kind"] == kind and meta["layers"] == 2
        assert type(loaded.layers) is type(model.layers)
        a = jax.tree.leaves(eqx.filter(model, eqx.is_array))
        b = jax.tree.leaves(eqx.filter(loaded, eqx.is_array))
        assert all(np.array_equal(u, v) and u.dtype == v.dtype for u, v in zip(a, b, strict=True))
        assert (loaded.layers.scale_n, loaded.layers.scale_s) == (
            model.layers.scale_n,
            model.layers.scale_s,
        )


@pytest.mark.parametrize(
    "src,dst",
    [
        (("gdpp", 3), ("diag", 3)),
        (("gdpp", 2), ("full", 2)),
        (("diag", 3), ("full", 3)),
        (("gdpp", 1), ("gdpp", 2)),
        (("diag", 2), ("diag", 3)),
        (("full", 2), ("full", 3)),
        (("diag", 2), ("diag", 2)),
    ],
)
def test_warm_start_is_an_exact_embedding(src, dst, tmp_path):
    """Without noise the warm-started model computes exactly the source's function (the
    implicit weights after the last layer, float64), and its new parameters are where the
    docs say: an identity first layer (P = 0), q_y = 0, FULL's P and Q block-diagonal."""
    source, path, config = _trained_like(*src, tmp_path)
    model, _ = _warm(*dst, path, tmp_path)
    assert model.num_layers == dst[1] and model.layers.__class__.__name__.lower().startswith(
        {"gdpp": "gdpp", "diag": "diag", "full": "full"}[dst[0]]
    )
    b = eqicl.sample_batch(jr.key(3), config.task, 32, F64)
    want = jax.vmap(source.implicit_weights)(b.x, b.y)[:, -1]
    got = jax.vmap(model.implicit_weights)(b.x, b.y)[:, -1]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    if dst[1] > src[1]:
        assert jnp.all(model.layers.p[0] == 0)
    if src == dst:  # a plain copy: nothing new to perturb
        return
    # with noise the function moves by O(noise) only
    noisy, _ = _warm(*dst, path, tmp_path, noise=1e-6)
    moved = jax.vmap(noisy.implicit_weights)(b.x, b.y)[:, -1]
    assert 0 < float(jnp.max(jnp.abs(moved - want))) < 1e-3 * float(jnp.max(jnp.abs(want)))


@pytest.mark.parametrize(
    "src,dst,sigma_max",
    [
        (("gdpp", 2), ("gdpp", 2), 5.0),
        (("diag", 2), ("diag", 3), 0.0),
        (("diag", 2), ("full", 2), 7.0),
        (("full", 3), ("full", 3), 1.0),
    ],
)
def test_a_model_of_another_noise_setting_starts_with_its_function(src, dst, sigma_max, tmp_path):
    """A file trained for sigma_max = 3 starting a run for another sigma_max (other units):
    rewritten in the run's units, the paper-unit P and Q, hence the function, are unchanged."""
    source, path, _ = _trained_like(*src, tmp_path)
    model, config = _warm(*dst, path, tmp_path, sigma_max=sigma_max)
    assert model.layers.scale_s != source.layers.scale_s  # other units indeed
    assert (
        model.layers.scale_s
        == eqicl.init_transformer(
            jr.key(0), dataclasses.replace(config.model, init_from=""), config.task
        ).layers.scale_s
    )
    b = eqicl.sample_batch(jr.key(3), config.task, 32, F64)
    want = jax.vmap(source.implicit_weights)(b.x, b.y)[:, -1]
    got = jax.vmap(model.implicit_weights)(b.x, b.y)[:, -1]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    if src == dst:
        p_src, q_src = jax.vmap(lambda layer: layer.pq())(source.layers)
        p_dst, q_dst = jax.vmap(lambda layer: layer.pq())(model.layers)
        np.testing.assert_allclose(p_dst, p_src, rtol=1e-13, atol=0)
        np.testing.assert_allclose(q_dst, q_src, rtol=1e-13, atol=0)


def test_warm_start_refuses_what_does_not_embed(tmp_path):
    _, full2, _ = _trained_like("full", 2, tmp_path)
    _, diag1, _ = _trained_like("diag", 1, tmp_path)
    with pytest.raises(eqicl.WeightsError, match="cannot start a DIAG"):
        _warm("diag", 2, full2, tmp_path)
    with pytest.raises(eqicl.WeightsError, match="it can start"):
        _warm("diag", 3, diag1, tmp_path)  # two layers more
    with pytest.raises(eqicl.WeightsError, match="it can start"):
        _warm("full", 2, diag1, tmp_path)  # wider and deeper at once
    with pytest.raises(eqicl.WeightsError, match="heads=1"):
        _warm("diag", 2, diag1, tmp_path, heads=2)
    with pytest.raises(eqicl.WeightsError, match="cannot read"):
        _warm("diag", 2, tmp_path / "missing.npz", tmp_path)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(eqicl.WeightsError, match="cannot read"):
        _warm("diag", 2, tmp_path / "bad.npz", tmp_path)


def test_train_command_refuses_a_bad_warm_start_before_writing(tmp_path, capsys):
    from eqicl.train import main

    _, full1, _ = _trained_like("full", 1, tmp_path)
    for bad in (tmp_path / "missing.npz", full1):  # missing; FULL cannot start DIAG
        run_dir = tmp_path / "run"
        args = ["--preset", "default", "--run-dir", str(run_dir), "--set", f"model.init_from={bad}"]
        assert main([*args, "--set", "task.sigma_max=1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1
        assert not run_dir.exists()


# --------------------------------------------------------------------------------------------
# Variants: every fact about a kind lives on its layer class


def test_every_variant_states_consistent_facts():
    """VARIANTS is the config's list of kinds; each class's `fields` are its array fields;
    `embeds` is a partial order (reflexive, antisymmetric, transitive) over the kinds."""
    import typing

    from eqicl._config import ModelKind

    variants = eqicl.VARIANTS
    assert set(variants) == set(typing.get_args(ModelKind))
    assert len({cls.label for cls in variants.values()}) == len(variants)
    for kind, cls in variants.items():
        assert cls.kind == kind and eqicl.MODEL_ROWS[kind] == cls.label
        arrays = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("static")}
        assert set(cls.fields) == arrays and cls.fields[0] == "p"
        assert kind in cls.embeds and set(cls.embeds) <= set(variants)
        for other in cls.embeds:
            assert other == kind or kind not in variants[other].embeds
            assert set(variants[other].embeds) <= set(cls.embeds)


def test_embeds_is_what_warm_starts_do(tmp_path):
    """Every pair of kinds at the same depth: a warm start works, and is exact without noise,
    exactly when the wider class `embeds` the source's kind."""
    variants = eqicl.VARIANTS
    for have in variants:
        source, path, config = _trained_like(have, 2, tmp_path)
        b = eqicl.sample_batch(jr.key(3), config.task, 16, F64)
        want = jax.vmap(source.implicit_weights)(b.x, b.y)[:, -1]
        for kind, cls in variants.items():
            if have not in cls.embeds:
                with pytest.raises(eqicl.WeightsError, match="cannot start"):
                    _warm(kind, 2, path, tmp_path)
                continue
            model, _ = _warm(kind, 2, path, tmp_path)
            assert model.kind == kind and type(model.layers) is cls
            got = jax.vmap(model.implicit_weights)(b.x, b.y)[:, -1]
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


class _GDAttention(eqicl.AbstractLinearAttention):
    """A fourth variant, for the tests: P_k = diag(0, …, 0, p_y), Q_k = diag(q_x I, 0),
    i.e. y_i ← y_i + Σ_k p_y q_x <α, x_i> (plain gradient steps)."""

    kind = "gd"
    label = "GD"
    fields = ("p", "q_x")
    embeds = ("gd",)

    p: jax.Array  # (heads,): p_y
    q_x: jax.Array  # (heads,)
    dim: int = eqx.field(static=True)
    scale_n: float = eqx.field(static=True, default=1.0)
    scale_s: float = eqx.field(static=True, default=1.0)

    @property
    def d(self):
        return self.dim

    def raw_pq(self):
        z = jnp.zeros((self.p.shape[0], self.dim + 1, self.dim + 1), self.p.dtype)
        eye = jnp.eye(self.dim + 1, dtype=self.p.dtype).at[-1, -1].set(0)
        return z.at[:, -1, -1].set(self.p), self.q_x[:, None, None] * eye[None]

    def operator(self, stats):
        p, q = self.pq()
        return jnp.einsum("kij,jl,klm->im", p, stats, q)

    @classmethod
    def init_arrays(cls, key, heads, d, scale, gd, dtype):
        kp, kq = jr.split(key)
        return {"p": scale * jr.normal(kp, (heads,), dtype), "q_x": jr.normal(kq, (heads,), dtype)}

    @classmethod
    def from_arrays(cls, arrays, d, scale_n=1.0, scale_s=1.0):
        return cls(**arrays, dim=d, scale_n=scale_n, scale_s=scale_s)

    @classmethod
    def rescaled(cls, arrays, r_n, r_s):
        return {**arrays, "p": arrays["p"] * (r_n * r_s)}


def test_a_new_variant_is_one_class(tmp_path, monkeypatch):
    """A variant defined here, registered in VARIANTS, goes through the generic code: stacked
    construction, units, weights files (bit-exact) and the kernel's operands."""
    from eqicl import _kernel
    from eqicl._model import _in_units

    monkeypatch.setitem(eqicl.VARIANTS, "gd", _GDAttention)
    d, heads, layers = 3, 2, 3
    keys = jr.split(jr.key(0), layers)
    arrays = jax.vmap(lambda k: _GDAttention.init_arrays(k, heads, d, 0.3, None, F64))(keys)
    stack = _GDAttention.stacked(arrays, d, 9.0, 2.0)
    model = LinearTransformer(layers=stack, num_layers=layers)
    assert model.kind == "gd" and model.layer(1).p.shape == (heads,)

    path = tmp_path / "gd.npz"
    eqicl.save_weights(model, path, select_loss=0.5)
    loaded, meta = eqicl.load_weights(path)
    assert (meta["kind"], meta["d"], meta["heads"], meta["layers"]) == ("gd", d, heads, layers)
    assert type(loaded.layers) is _GDAttention and loaded.layers.dim == d
    assert (loaded.layers.scale_n, loaded.layers.scale_s) == (9.0, 2.0)
    for name in _GDAttention.fields:
        a, b = getattr(model.layers, name), getattr(loaded.layers, name)
        assert a.dtype == b.dtype and np.array_equal(a, b)

    # The same function in paper units: P and Q in paper units unchanged.
    paper = _GDAttention.stacked(
        _in_units(_GDAttention, arrays, (9.0, 2.0), (1.0, 1.0)), d, 1.0, 1.0
    )
    for got, want in zip(model.pq(), LinearTransformer(paper, layers).pq(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)

    x, y, xq = _data(jr.key(4), d=d)
    mode, p, q = _kernel.operands(model)
    assert mode == 0
    np.testing.assert_allclose(_numpy_forward(p, q, x, y, xq), model(x, y, xq), rtol=1e-12)
