import json

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import analysis
import eqicl
from analysis import extract as extract_cli
from eqicl import FullAttention, LinearTransformer

F64 = jnp.float64


# model.tokens is not jitted in eqicl; one jitted wrapper is compiled once per model shape.
_tokens = eqx.filter_jit(lambda model, x, y, xq: model.tokens(x, y, xq))


def _stack(layers):
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    return LinearTransformer(layers=stacked, num_layers=len(layers))


def _random_model(kind, key, layers=3, heads=3, scale=0.2, d=4, n=9):
    # One shape for every test, so that jit compilations are shared between them.
    task = eqicl.TaskConfig(d=d, n=n, sigma_max=1.5)
    cfg = eqicl.ModelConfig(kind=kind, layers=layers, heads=heads, init="normal", init_scale=scale)
    return eqicl.init_transformer(key, cfg, task, F64), task


@pytest.mark.parametrize("units", ["scaled", "paper"])
def test_recursion_reproduces_every_token_of_full_models(units):
    """Theorem 4.1 with the SPEC §6 recursion, from the weights and Σ, α, λ only, gives every
    context and query token after every layer of a random multi-head FULL model."""
    task = eqicl.TaskConfig(d=4, n=9, sigma_max=1.5)
    cfg = eqicl.ModelConfig(
        kind="full", layers=3, heads=3, init="normal", init_scale=0.2, units=units
    )
    for i, key in enumerate(jr.split(jr.key(0), 3)):
        model = eqicl.init_transformer(key, cfg, task, F64)
        b = eqicl.sample_batch(jr.fold_in(jr.key(1), i), task, 8, F64)
        x, y = b.x[0], b.y[0]
        terms = analysis.theorem41_terms(model, x, y)
        want = _tokens(model, x, y, b.xq)
        got = analysis.reconstruct_tokens(terms, x, y, b.xq)
        assert float(jnp.max(jnp.abs(want))) > 1.0  # the layers do move the tokens
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
        # S^l rebuilt from the terms is the statistics the forward pass feeds layer l + 1.
        n = x.shape[0]
        stats = jnp.stack([eqicl.context_statistics(e, n) for e in want[:-1]])
        np.testing.assert_allclose(terms.stats, stats, rtol=1e-10, atol=1e-10)


def test_full_analysis_reconstructs_at_round_off_and_reads_off_structure():
    model, task = _random_model("full", jr.key(2))
    batch = eqicl.sample_batch(jr.key(3), task, 8, F64)
    result = analysis.analyse(model, batch)
    rec = result["reconstruction"]
    assert rec["max_rel"] < 1e-12
    assert len(rec["per_layer_max_abs"]) == model.num_layers + 1
    assert rec["per_layer_max_abs"][0] == 0.0  # before the first layer the terms are exact
    assert "momentum" not in result  # Lemma 4.4 is a DIAG statement
    # Random P, Q: little of their mass is diagonal, and the rest has full rank.
    p = result["structure"][0][0]["P"]
    assert p["diagonal_fraction"] < 0.5 and p["rest_rank_99"] >= task.d
    np.testing.assert_allclose(result["coefficients"]["values"], analysis.block_statistics(model))


@pytest.mark.parametrize("n", [9, 3])  # n <= d: Σ singular, w* = Σ⁺α
def test_lemma44_identity_for_random_diag_models(n):
    model, task = _random_model("diag", jr.key(4), n=n)
    batch = eqicl.sample_batch(jr.key(5), task, 8, F64)
    terms = analysis.batch_terms(model, batch.x, batch.y)
    mo = analysis.batch_momentum(model.coefficients(), terms, batch.x, batch.y)
    assert float(jnp.max(jnp.abs(terms.u))) > 1e-2  # the buffer is in use
    np.testing.assert_allclose(mo.u_next, terms.u[:, 1:], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(mo.w_next, terms.w[:, 1:], rtol=1e-10, atol=1e-10)
    summary = analysis.momentum_summary(model, batch, terms)
    assert summary["identity_max_abs"] < 1e-10
    # Λ = −w_xy a² ρ I − w_xx Σ^l, checked against its definition on one sequence.
    wxx, wxy = np.asarray(model.coefficients())[0, :2]
    x0, y0 = np.asarray(batch.x[0]), np.asarray(batch.y[0])
    rho = y0 @ y0 - y0 @ x0 @ np.linalg.pinv(x0.T @ x0) @ x0.T @ y0
    want = -wxy * rho * np.eye(x0.shape[1]) - wxx * x0.T @ x0  # layer 1: a = 1, Σ^0 = Σ
    np.testing.assert_allclose(mo.Lambda[0, 0], want, rtol=1e-10, atol=1e-12)


def test_gd_construction_extracts_the_gd_iterates():
    """P = −η e_y e_yᵀ, Q = diag(I, 0): M^l = I, u^l = 0, a^l = 1 and w^l is the l-th GD
    iterate on ½Σ(y_i − <w, x_i>)² from 0; the block statistics are (0, 0, −η, 0)."""
    task = eqicl.TaskConfig(d=5, n=12, noise="fixed", sigma=0.7)
    b = eqicl.sample_batch(jr.key(6), task, 2, F64)
    x, y = b.x[0], b.y[0]
    d, eta, L = 5, 0.03, 4
    p = jnp.zeros((1, d + 1, d + 1), F64).at[0, d, d].set(-eta)
    q = jnp.zeros((1, d + 1, d + 1), F64).at[0, :d, :d].set(jnp.eye(d, dtype=F64))
    model = _stack([FullAttention(p=p, q=q)] * L)
    terms = analysis.theorem41_terms(model, x, y)
    xn, yn = np.asarray(x), np.asarray(y)
    w, iterates = np.zeros(d), [np.zeros(d)]
    for _ in range(L):
        w = w + eta * xn.T @ (yn - xn @ w)
        iterates.append(w)
    np.testing.assert_allclose(terms.w, np.array(iterates), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(terms.M, jnp.broadcast_to(jnp.eye(d, dtype=F64), (L + 1, d, d)))
    np.testing.assert_array_equal(terms.u, 0.0)
    np.testing.assert_array_equal(terms.a, 1.0)
    want = np.tile([0.0, 0.0, -eta, 0.0], (L, 1))
    np.testing.assert_allclose(analysis.coefficients(model), want, rtol=1e-15, atol=0)
    structure = analysis.full_structure(model)
    assert structure[0][0]["P"]["rest_rank_99"] == 0  # P is exactly diagonal
    assert structure[0][0]["Q"]["diagonal_fraction"] == 1.0


def test_gdpp_extraction_has_no_xy_and_no_yy_terms():
    model, task = _random_model("gdpp", jr.key(7))
    batch = eqicl.sample_batch(jr.key(8), task, 8, F64)
    coef = analysis.coefficients(model)
    np.testing.assert_array_equal(coef[:, 1], 0.0)
    np.testing.assert_array_equal(coef[:, 3], 0.0)
    assert float(jnp.min(jnp.abs(coef[:, 0]))) > 0 and float(jnp.min(jnp.abs(coef[:, 2]))) > 0
    result = analysis.analyse(model, batch)
    assert result["reconstruction"]["max_rel"] < 1e-12
    terms = analysis.batch_terms(model, batch.x, batch.y)
    np.testing.assert_array_equal(terms.u, 0.0)  # no w_xy: no momentum buffer
    np.testing.assert_array_equal(terms.a, 1.0)  # no w_yy: no rescaling
    assert all(layer["momentum_share"]["mean"] == 0.0 for layer in result["momentum"]["layers"])
    assert all(r["mean"] == 1.0 for r in result["noise"]["rescaling"])


def test_block_statistics_equal_diag_coefficients():
    model, _ = _random_model("diag", jr.key(9))
    np.testing.assert_allclose(
        analysis.block_statistics(model), model.coefficients(), rtol=1e-13, atol=1e-16
    )


def test_matrix_structure_of_diagonal_plus_rank_one():
    d = 4
    m = np.diag([0.5] * d + [-2.0])
    m[0, 1] = 0.3
    s = analysis.matrix_structure(m)
    assert s["x_diagonal_mean"] == 0.5 and s["yy"] == -2.0
    assert s["rest_rank_99"] == 1 and s["rest_stable_rank"] == pytest.approx(1.0, rel=1e-12)
    assert s["diagonal_fraction"] == pytest.approx(5.0 / (5.0 + 0.09), rel=1e-12)


def test_weight_distances_match_the_evaluator_and_numpy_ridge():
    model, task = _random_model("diag", jr.key(10), scale=0.1)
    batch = eqicl.sample_batch(jr.key(11), task, 8, F64)
    terms = analysis.batch_terms(model, batch.x, batch.y)
    lams = [0.0, 0.3, 2.0]
    dist = analysis.weight_distances(terms, batch, lams)
    sp = eqicl.spectral(batch)
    w_fwd = jax.vmap(model.implicit_weights)(batch.x, batch.y)  # from the forward pass
    want = [float(jnp.mean(eqicl.exact_loss(sp, sp.to_coords(w_fwd[:, j])))) for j in range(3)]
    np.testing.assert_allclose([v["mean"] for v in dist["oracle"][1:]], want, rtol=1e-10)
    w = np.asarray(terms.w)
    for j, lam in enumerate(lams):
        ridge = np.stack(
            [
                np.linalg.solve(xb.T @ xb + lam * np.eye(task.d), xb.T @ yb)
                for xb, yb in zip(np.asarray(batch.x), np.asarray(batch.y), strict=True)
            ]
        )
        got = np.array(dist["ridge"])[:, j]
        np.testing.assert_allclose(
            got, 0.5 * np.sum((w - ridge[:, None]) ** 2, -1).mean(0), rtol=1e-10
        )
    assert dist["ols"] == np.array(dist["ridge"])[:, 0].tolist()


def test_noise_adaptation_is_the_diag_formula():
    model, task = _random_model("diag", jr.key(12), scale=0.1)
    batch = eqicl.sample_batch(jr.key(13), task, 8, F64)
    terms = analysis.batch_terms(model, batch.x, batch.y)
    noise = analysis.noise_adaptation(model, batch, terms)
    coef = np.asarray(model.coefficients())
    tokens = jax.vmap(_tokens, in_axes=(None, 0, 0, 0))(model, batch.x, batch.y, batch.xq[:, None])
    lam_l = np.sum(np.asarray(tokens)[:, :-1, : task.n, -1] ** 2, axis=-1)  # (batch, layers)
    np.testing.assert_allclose(
        [r["mean"] for r in noise["rescaling"]], (1 + coef[None, :, 3] * lam_l).mean(0), rtol=1e-12
    )
    rho = np.asarray(jax.vmap(analysis.rss)(batch.x, batch.y)[1])
    step = coef[None, :, 2] * (1 + coef[None, :, 1] * rho[:, None])
    np.testing.assert_allclose(
        [s["mean"] for s in noise["effective_step"]], step.mean(0), rtol=1e-12
    )


# Run directories -------------------------------------------------------------------------


def _fake_run(path, fmt=None, eval_json=None):
    path.mkdir(parents=True, exist_ok=True)
    fmt = eqicl._run.FORMAT if fmt is None else fmt
    cfg = {"format": fmt, "eqicl": "0.1.0", "config": eqicl.preset("tiny").to_dict()}
    (path / "config.json").write_text(json.dumps(cfg))
    if eval_json is not None:
        (path / "eval.json").write_text(json.dumps(eval_json))
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "no config.json"),
        (lambda p: _fake_run(p / "old", fmt=99), "another eqicl version"),
        (lambda p: _fake_run(p / "unfinished"), "unfinished"),
        (lambda p: _fake_run(p / "bad", eval_json={"status": "ok"}), "not a valid eval.json"),
        (
            lambda p: _fake_run(
                p / "failed",
                eval_json={"status": "failed", "reason": "NaN", "selection": {"best": 0}},
            ),
            "failed run",
        ),
        (
            lambda p: _fake_run(p / "nockpt", eval_json={"status": "ok", "selection": {"best": 0}}),
            "checkpoint 40, the model eval.json describes, is missing",
        ),
    ],
)
def test_bad_run_directories_fail_with_one_line(tmp_path, capsys, make, message):
    rc = extract_cli.main([str(make(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_bad_arguments_are_usage_errors(tmp_path, capsys):
    for args in (["--sequences", "1"], ["--sigma", "x"], ["--sigma", "-1"]):
        with pytest.raises(SystemExit) as e:
            extract_cli.main([str(tmp_path), *args])
        assert e.value.code == 2
        assert "Traceback" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished `tiny` run, shortened to 20 steps: analysis needs a trained model, not a
    good one."""
    path = tmp_path_factory.mktemp("runs") / "tiny"
    short = [
        "train.steps=20",
        "train.select_sequences=128",
        "eval.sequences=500",
        "eval.tune_sequences=500",
        "eval.chunk=500",
        "eval.profile_points=2",
    ]
    eqicl.run(eqicl.preset("tiny", short), path, progress=False, echo=lambda _: None)
    return path


def test_extract_end_to_end_on_a_tiny_run(tiny_run, capsys):
    rc = extract_cli.main([str(tiny_run), "--sequences", "64", "--sigma", "0,0.5", "1.5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Theorem 4.1 reconstruction" in out and "Lemma 4.4 identity" in out
    result = json.loads((tiny_run / "analysis" / "extract.json").read_text())
    assert result["kind"] == "diag" and result["layers"] == 2 and result["sequences"] == 64
    assert result["reconstruction"]["max_rel"] < 1e-12
    assert result["momentum"]["identity_max_rel"] < 1e-10
    assert result["per_sigma"]["sigma"] == [0.0, 0.5, 1.5]
    assert len(result["per_sigma"]["best_lambda"]) == 3
    model, _ = eqicl.load_model(tiny_run)
    np.testing.assert_allclose(
        result["coefficients"]["values"], np.asarray(model.coefficients(), np.float64), rtol=1e-6
    )
    files = {
        "pq": "pq_heatmaps",
        "coefficients": "coefficients",
        "loss_after_layers": "loss_after_layers",
        "noise": "noise_adaptation",
        "training": "training_curve",
    }
    assert "metrics" not in result  # the curve is drawn from metrics.jsonl, not copied in
    for name, stem in files.items():
        png = tiny_run / "analysis" / f"{stem}.png"
        assert result["figures"][name] == str(png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
