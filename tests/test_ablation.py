"""The mechanism ablations (analysis._ablation): the coefficient variants against closed forms
(DIAG-4 is DIAG, both removed is GD++, w_xy ≡ 0 keeps Theorem 4.1's momentum buffer at 0),
every fast path against the token equation, training that never moves a fixed coefficient,
and the command on the committed weights and trained small."""

import csv
import io
import json
import pathlib

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from test_sweep import SMALL

import analysis
import eqicl
from analysis import _ablation as ab
from analysis.ablation import main

F64 = jnp.float64
TASK = eqicl.TaskConfig(d=4, n=9, sigma_max=2.0)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _diag(kind="diag", layers=3, seed=0):
    config = eqicl.ModelConfig(kind=kind, layers=layers, init_scale=0.05)
    return eqicl.init_transformer(jr.key(seed), config, TASK, F64)


def _token_exact_losses(model, batch):
    """½‖wˡ − μ‖² from the token equation alone: wˡ by querying the basis vectors."""
    w = jax.vmap(model.implicit_weights)(batch.x, batch.y)
    mu = jax.vmap(eqicl.oracle_weights)(batch.x, batch.y, batch.sigma)
    return 0.5 * jnp.sum((w - mu[:, None]) ** 2, axis=-1)


def _predictions(model, batch):
    return jax.vmap(model.predict)(batch.x, batch.y, batch.xq)


def test_the_free_variant_is_diag_and_both_removed_is_gdpp():
    batch = eqicl.sample_batch(jr.key(1), TASK, 32, F64)
    diag = _diag()
    free = ab.as_variant(diag, ab.FreeCoefficients)
    np.testing.assert_allclose(free.coefficients(), diag.coefficients(), rtol=1e-14)
    np.testing.assert_allclose(_predictions(free, batch), _predictions(diag, batch), rtol=1e-12)
    gdpp = _diag("gdpp", seed=2)
    neither = ab.as_variant(gdpp, ab.Neither)
    np.testing.assert_allclose(_predictions(neither, batch), _predictions(gdpp, batch), rtol=1e-12)
    # Removing a mechanism zeroes its coefficient and only it.
    c = diag.coefficients()
    for cls, gone in ((ab.NoMomentum, [1]), (ab.NoRescaling, [3]), (ab.Neither, [1, 3])):
        got = ab.as_variant(diag, cls).coefficients()
        want = c.at[:, jnp.asarray(gone)].set(0.0)
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
        np.testing.assert_array_equal(got[:, jnp.asarray(gone)], 0.0)
    # The free variant is not rank one, as one head of DIAG is: it is a larger class.
    p = free.layers.p.at[:, 0, 0].set(0.3)
    wider = eqicl.LinearTransformer(
        layers=ab.FreeCoefficients.stacked({"p": p}, 4, free.layers.scale_n, free.layers.scale_s),
        num_layers=3,
    )
    wxx, wxy, wyx, wyy = wider.coefficients()[0]
    assert abs(wxx * wyy - wxy * wyx) > 1e-6


def test_every_fast_path_computes_the_token_equation():
    """The statistics route (exact losses, the training loss) and P, Q read the variants as
    the tokens do."""
    from eqicl._fast import stats_from_batch

    batch = eqicl.sample_batch(jr.key(3), TASK, 48, F64)
    sp = eqicl.spectral(batch)
    for cls in ab.ABLATIONS.values():
        model = ab.as_variant(_diag(seed=4), cls)
        assert model.statistics_exact
        want = _token_exact_losses(model, batch)
        np.testing.assert_allclose(
            eqicl.model_exact_losses(model, batch, sp), want, rtol=1e-10, atol=1e-14
        )
        stats = eqicl.TrainConfig(formulation="stats", loss_clip=0.0)
        tokens = eqicl.TrainConfig(formulation="tokens", loss_clip=0.0)
        np.testing.assert_allclose(
            eqicl.loss_fn(model, stats_from_batch(batch), stats),
            eqicl.loss_fn(model, batch, tokens),
            rtol=1e-10,
        )
        # P and Q in paper units make the same operator as the coefficients.
        layer = jax.tree.map(lambda a: a[0], model.layers)
        s = jr.normal(jr.key(5), (5, 5), F64)
        p, q = layer.pq()
        np.testing.assert_allclose(
            jnp.einsum("kij,jl,klm->im", p, s, q), layer.operator(s), rtol=1e-12, atol=1e-15
        )


def test_without_w_xy_the_momentum_buffer_stays_zero():
    """Theorem 4.1: u^{l+1} = (I + A) u^l + a^l b with b = w_xy α; b = 0 keeps u = 0."""
    batch = eqicl.sample_batch(jr.key(6), TASK, 1, F64)
    x, y = batch.x[0], batch.y[0]
    diag = _diag(seed=7)
    free = analysis.theorem41_terms(ab.as_variant(diag, ab.FreeCoefficients), x, y)
    assert float(jnp.max(jnp.abs(free.u[1:]))) > 1e-6
    for cls in (ab.NoMomentum, ab.Neither):
        terms = analysis.theorem41_terms(ab.as_variant(diag, cls), x, y)
        np.testing.assert_array_equal(terms.u, 0.0)


def test_training_never_moves_a_fixed_coefficient_and_weights_round_trip(tmp_path):
    config = eqicl.preset("tiny", ["train.dtype=float64", "train.steps=30", "model.layers=2"])
    for cls in (ab.NoMomentum, ab.NoRescaling):
        trainer = eqicl.Trainer(config, init=lambda key, cls=cls: ab.init_variant(key, cls, config))
        state = trainer.init()
        before = np.asarray(eqicl.ensemble_member(state.model, 0).coefficients())
        for _ in range(3):  # (advance donates the state's buffers)
            state, _ = trainer.advance(state)
        after = eqicl.ensemble_member(state.model, 0).coefficients()
        fixed = jnp.asarray([ab.NAMES.index(n) for n in cls.zero])
        np.testing.assert_array_equal(after[:, fixed], 0.0)
        np.testing.assert_array_equal(
            eqicl.ensemble_member(state.model, 0).layers.p[:, :, fixed], 0.0
        )
        free = jnp.asarray([i for i, n in enumerate(ab.NAMES) if n not in cls.zero])
        assert float(jnp.max(jnp.abs(after[:, free] - before[:, free]))) > 1e-6
        model = eqicl.ensemble_member(state.model, 0)
        path = tmp_path / f"{cls.kind}.npz"
        eqicl.save_weights(model, path)
        back, meta = eqicl.load_weights(path, layer_class=cls)
        assert meta["kind"] == cls.kind
        np.testing.assert_array_equal(back.coefficients(), model.coefficients())
        grown = ab.grow(model, jr.key(8), 0.0)  # an identity layer in front
        batch = eqicl.sample_batch(jr.key(9), config.task, 8, F64)
        np.testing.assert_allclose(
            _predictions(grown, batch), _predictions(model, batch), rtol=1e-12
        )


def test_the_command_at_test_time_on_the_committed_weights(tmp_path, capsys):
    out = tmp_path / "ablation"
    args = ["--paper-dir", str(ROOT / "runs" / "paper"), "--out", str(out), "--no-progress"]
    assert main([*args, "--layers", "3", "--noise", "5", "--sequences", "2000"]) == 0
    rows = list(csv.DictReader(io.StringIO((out / "test_time.csv").read_text())))
    assert [r["variant"] for r in rows] == ["DIAG", "w_xy=0", "w_yy=0", "both=0", "GD++ trained"]
    assert {(r["layers"], r["noise"], r["sequences"]) for r in rows} == {("3", "5", "2000")}
    # the unablated row is the committed model itself: its plain estimate is finite, precise
    assert 0 < float(rows[0]["plain_se"]) < 0.2 * float(rows[0]["plain"])
    assert (out / "test_time.png").stat().st_size > 0
    # another cell: added to the table, the first one's rows kept
    assert main([*args, "--layers", "2", "--noise", "5", "--sequences", "2000"]) == 0
    both = list(csv.DictReader(io.StringIO((out / "test_time.csv").read_text())))
    assert both[:5] == rows and {r["layers"] for r in both[5:]} == {"2"} and len(both) == 10
    for bad, message in (
        (["--sequences", "1"], "--sequences must be in [2, 1e9]"),
        (["--steps", "5"], "--steps and --set are for --train and --recipe"),
        (["--train-only"], "--train-only is for --recipe"),
        (["--layers", "9"], "unknown layers"),
    ):
        assert main([*args, *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "\n" not in err.strip()


@pytest.mark.slow  # eight small trainings in one process: about a minute on 2 cores
def test_the_command_trains_each_variant_and_resumes(tmp_path, capsys):
    """--train: every variant at two depths of one noise setting, the deeper from the
    shallower; a second run trains nothing and writes the same table."""
    out, runs = tmp_path / "ablation", tmp_path / "runs"
    args = ["--train", "--out", str(out), "--run-root", str(runs), "--no-progress"]
    args += ["--layers", "1-2", "--noise", "0", "--sequences", "500", "--steps", "20"]
    args += ["--set", "train.batch=32", "--set", "train.select_sequences=64"]
    args += ["--set", "train.steps_per_call=10", "--set", "train.checkpoint_every=10"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.count("trained ") == 8
    table = (out / "trained.csv").read_text()
    assert main(args) == 0
    assert "trained diag4" not in capsys.readouterr().out
    assert (out / "trained.csv").read_text() == table
    rows = list(csv.DictReader(io.StringIO(table)))
    assert sorted((r["layers"], r["variant"]) for r in rows) == sorted(
        (str(layers), kind) for layers in (1, 2) for kind in ab.ABLATIONS
    )
    assert all(float(r["plain_se"]) > 0 and r["sequences"] == "500" for r in rows)
    _, meta = eqicl.load_weights(
        runs / "weights" / "diag4-no-momentum-L2-u0.npz", layer_class=ab.NoMomentum
    )
    assert meta["start"] == "L-1" and json.loads(json.dumps(meta))["steps"] == 20


@pytest.mark.parametrize("cls", list(ab.ABLATIONS.values()))
def test_a_variant_refuses_what_it_cannot_hold(cls):
    if cls is not ab.FreeCoefficients:
        with pytest.raises(TypeError, match="cannot embed"):
            cls.embed(_diag().layers, jr.key(0), 0.0, F64)
    with pytest.raises(eqicl.ConfigError, match="one row"):
        cls.init_arrays(jr.key(0), 2, 4, 0.1, None, F64)


def test_the_variants_are_sweep_cells_of_their_own_lineup(tmp_path):
    """The variants as a lineup of the sweep: narrowest first, each starting from what it
    embeds (both removed → each one removed → the free one), trained like DIAG (its rate and
    steps, the paper's DIAG value beside them); run through a cold and a warm stage, their
    rows read back as their cells and their weights load as their classes, a fixed
    coefficient still exactly 0."""
    from eqicl._sweep import Recipe, Train, cell_config, narrower_kinds, parse_cells
    from eqicl.sweep import Cell, read_table, run_recipe, weights_path

    assert ab.LINEUP.kinds == ("diag4-neither", "diag4-no-rescaling", "diag4-no-momentum", "diag4")
    assert narrower_kinds("diag4-no-momentum") == ["diag4-neither"]
    assert narrower_kinds("diag4") == ["diag4-neither", "diag4-no-rescaling", "diag4-no-momentum"]
    assert narrower_kinds("diag") == ["gdpp"]  # Table 1's lineup as it was
    config = cell_config(Cell("diag4-no-rescaling", 6, "5"), None, None)
    diag = cell_config(Cell("diag", 6, "5"), None, None)
    assert config.model.kind == "diag4-no-rescaling" and config.train == diag.train
    with pytest.raises(eqicl.sweep.SweepError, match="unknown model 'diag4'"):
        parse_cells("diag4", "1", "0")  # not a Table 1 model
    cells = parse_cells("diag4-neither,diag4-no-momentum", "1", "0", lineup=ab.LINEUP)
    recipe = Recipe(
        (Train("cold", max_layers="1"), Train("warm", warm=True, starts_from=("cold",)))
    )
    paper = tmp_path / "paper"
    # In 20 steps the coefficient variants need a higher rate than DIAG's to end better than
    # one GD step (else the cell is "suspect" and records no weights to start from).
    extra = [*SMALL, "train.lr=0.2"]
    run_recipe(
        cells,
        paper,
        tmp_path / "runs",
        extra=extra,
        echo=lambda _: None,
        progress=False,
        recipe=recipe,
        test_sequences=0,
    )
    want = eqicl.paper_table()[("DIAG", 1, "0")]
    for stage in ("cold", "warm"):
        rows = read_table(paper / "candidates" / stage / "table1.csv")
        assert sorted(rows) == sorted(cells) and {r["status"] for r in rows.values()} == {"ok"}
        assert [rows[c]["method"] for c in cells] == ["DIAG-4, w_xy ≡ w_yy ≡ 0", "DIAG-4, w_xy ≡ 0"]
        assert all(abs(float(r["paper"]) - want) < 1e-5 * want for r in rows.values())
    warm = read_table(paper / "candidates" / "warm" / "table1.csv")
    assert warm[cells[0]]["init"] == "gd"  # both removed, 1 layer: nothing narrower
    # no momentum: from both removed (the better of its cold and warm candidates)
    assert warm[cells[1]]["init"] in {"cold/diag4-neither-L1-u0", "warm/diag4-neither-L1-u0"}
    model, meta = eqicl.load_weights(weights_path(paper, cells[1]))
    assert type(model.layers) is ab.NoMomentum and meta["kind"] == "diag4-no-momentum"
    assert float(jnp.abs(model.layers.p[..., 1]).max()) == 0.0  # w_xy, never moved


@pytest.mark.slow  # twelve small trainings: about a minute and a half on 2 cores
def test_the_command_trains_the_variants_by_the_recipe_and_resumes(tmp_path, monkeypatch, capsys):
    """--recipe: the variants through the (here: two-stage) recipe at 1-2 layers of one noise
    setting, then scored on the ablation's test seed; a second run trains nothing and writes
    the same table."""
    from eqicl._sweep import Recipe, Train

    small = Recipe((Train("cold", max_layers="1"), Train("warm", warm=True, starts_from=("cold",))))
    monkeypatch.setattr(eqicl._sweep, "RECIPE", small)
    out, sweep = tmp_path / "ablation", tmp_path / "sweep"
    args = ["--recipe", "--out", str(out), "--sweep-dir", str(sweep), "--no-progress"]
    args += ["--run-root", str(tmp_path / "runs"), "--layers", "2", "--noise", "0"]
    args += ["--sequences", "500"]
    for s in [*SMALL, "train.lr=0.2"]:
        args += ["--set", s]
    assert main(args) == 0
    assert "the Table 1 recipe on 8 variant cells" in capsys.readouterr().out
    table = (out / "recipe.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(table)))
    assert sorted(r["variant"] for r in rows) == sorted(ab.ABLATIONS)  # --layers 2 reported
    assert {(r["layers"], r["noise"], r["sequences"]) for r in rows} == {("2", "0", "500")}
    assert all(float(r["plain_se"]) > 0 for r in rows)
    assert (out / "recipe.png").stat().st_size > 0
    assert main(args) == 0
    assert "cold: 4 cells, 4 recorded, 0 to run" in capsys.readouterr().out
    assert (out / "recipe.csv").read_text() == table


def test_a_lineup_that_cannot_be_a_sweeps_is_one_line():
    from eqicl.sweep import Lineup, SweepError, register_lineup

    assert register_lineup(ab.LINEUP) is ab.LINEUP  # again: a no-op
    for lineup, message in (
        (Lineup("x", ("diag4", "gdpp"), {"diag4": "diag"}), "`like` must name each of its kinds"),
        (Lineup("x", ("nope",), {"nope": "diag"}), "lineup x: unknown model kind 'nope'"),
        (Lineup("x", ("diag4",), {"diag4": "mlp"}), "diag4 is trained like 'mlp', not one of"),
        (Lineup("x", ("diag",), {"diag": "diag"}), "the kind diag is lineup table1's"),
        (Lineup("ablation", ("diag4",), {"diag4": "diag"}), "named ablation is registered with"),
    ):
        with pytest.raises(SweepError, match=message) as e:
            register_lineup(lineup)
        assert "\n" not in str(e.value)
