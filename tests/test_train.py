import json
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqicl
from eqicl._checkpoint import checkpoint_manager, restore_checkpoint, save_checkpoint
from eqicl.train import main


def _tiny(*extra):
    return eqicl.preset("tiny", list(extra))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The `tiny` preset end to end through the command line."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["--preset", "tiny", "--run-dir", str(run_dir), "--no-progress"]) == 0
    return run_dir


def _arrays(state):
    return [np.asarray(a) for a in jax.tree.leaves(eqx.filter(state, eqx.is_array))]


def test_tiny_run_writes_the_run_directory(tiny_run):
    config = _tiny()
    saved = json.loads((tiny_run / "config.json").read_text())
    assert saved["format"] == 2 and eqicl.Config.from_dict(saved["config"]) == config
    lines = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    tc = config.train
    assert [x["step"] for x in lines] == list(
        range(tc.steps_per_call, tc.steps + 1, tc.steps_per_call)
    )
    assert all(len(x["loss"]) == tc.seeds and all(np.isfinite(x["loss"])) for x in lines)
    ev = json.loads((tiny_run / "eval.json").read_text())
    assert ev["status"] == "ok" and ev["sequences"] == config.eval.sequences
    assert len(ev["selection"]["losses"]) == tc.seeds
    assert ev["selection"]["best"] == int(np.argmin(ev["selection"]["losses"]))
    model = ev["model"]
    assert [r["layer"] for r in model["after_layer"]] == list(range(1, config.model.layers + 1))
    for est in ("adjusted_exact", "adjusted_sampled", "unadjusted"):
        assert model[est]["se"] > 0 and np.isfinite(model[est]["mean"])
    # Both estimators estimate the same adjusted loss.
    ex, sa = model["adjusted_exact"], model["adjusted_sampled"]
    assert abs(ex["mean"] - sa["mean"]) < 4 * (ex["se"] + sa["se"])
    assert {"oracle", "constrr", "adarr", "tunedrr", "ols"} <= set(ev["baselines"])
    assert abs(ev["baselines"]["oracle"]["adjusted_exact"]["mean"]) == 0.0
    assert len(ev["profile"]["sigma"]) == config.eval.profile_points
    assert ev["paper"]["model"] is None  # d = 4: not a Table 1 cell


def test_training_reduces_the_loss(tiny_run):
    lines = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert min(lines[-1]["loss"]) < min(lines[0]["loss"])


def test_resume_equals_uninterrupted(tiny_run, tmp_path):
    """Delete the last checkpoint and the results, rerun the same command: the resumed run
    must end bitwise where the uninterrupted one did."""
    config = _tiny()
    resumed = tmp_path / "tiny"
    shutil.copytree(tiny_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / str(config.train.steps))
    (resumed / "eval.json").unlink()
    assert main(["--preset", "tiny", "--run-dir", str(resumed), "--no-progress"]) == 0
    a = restore_checkpoint(tiny_run, config)
    b = restore_checkpoint(resumed, config)
    assert int(a.step[0]) == int(b.step[0]) == config.train.steps
    for x, y in zip(_arrays(a), _arrays(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # metrics.jsonl holds each step once, as an uninterrupted run's does.
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))
    ea = json.loads((tiny_run / "eval.json").read_text())["model"]["adjusted_exact"]
    eb = json.loads((resumed / "eval.json").read_text())["model"]["adjusted_exact"]
    assert ea == eb


def test_checkpoint_round_trip(tmp_path):
    config = _tiny()
    state = eqicl.init_ensemble(config)
    state = eqx.tree_at(lambda s: s.step, state, state.step + 20)
    manager = checkpoint_manager(tmp_path)
    save_checkpoint(manager, state)
    back = restore_checkpoint(tmp_path, config)
    assert jax.tree.structure(eqx.filter(back, eqx.is_array)) == jax.tree.structure(
        eqx.filter(state, eqx.is_array)
    )
    for x, y in zip(_arrays(state), _arrays(back), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_a_checkpoint_is_a_named_tree_plain_orbax_reads(tmp_path):
    """A checkpoint's state item is the state's arrays named by their place (model → layers →
    p, opt_state → ..., step): plain orbax restores it without eqicl, array for array."""
    import orbax.checkpoint as ocp

    config = _tiny()
    state = eqicl.init_ensemble(config)
    state = eqx.tree_at(lambda s: s.step, state, state.step + 20)
    manager = checkpoint_manager(tmp_path)
    save_checkpoint(manager, state)
    manager.close()
    plain = ocp.StandardCheckpointer().restore(
        (tmp_path / "checkpoints" / "20" / "state").absolute()
    )
    np.testing.assert_array_equal(plain["model"]["layers"]["p"], state.model.layers.p)
    np.testing.assert_array_equal(plain["step"], state.step)
    np.testing.assert_array_equal(plain["recent"], state.recent)
    assert {"model", "opt_state", "step", "lr_scale", "rollbacks", "skipped", "recent"} == set(
        plain
    )


def test_a_checkpoint_of_the_earlier_flat_layout_still_restores(tmp_path):
    """Checkpoints written before the named layout (leaves under "00000", "00001", ...; no
    "layout" in their metadata) restore into the same state."""
    import orbax.checkpoint as ocp

    from eqicl import _checkpoint

    config = _tiny()
    state = eqicl.init_ensemble(config)
    state = eqx.tree_at(lambda s: s.step, state, state.step + 20)
    arrays = _arrays(state)
    meta = {
        "step": 20,
        "arrays": _checkpoint._signature(arrays),
        "sha256": _checkpoint._digest(arrays),
    }
    manager = checkpoint_manager(tmp_path)
    manager.save(
        20,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_checkpoint._as_dict(arrays)), meta=ocp.args.JsonSave(meta)
        ),
    )
    manager.wait_until_finished()
    manager.close()
    back = restore_checkpoint(tmp_path, config)
    for x, y in zip(arrays, _arrays(back), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_load_model_gives_the_selected_seed(tiny_run):
    model, config = eqicl.load_model(tiny_run)
    ev = json.loads((tiny_run / "eval.json").read_text())
    task = config.task
    batch = eqicl.sample_batch(jax.random.key(0), task, 3, jnp.float32)
    assert model(batch.x[0], batch.y[0], batch.xq).shape == (config.model.layers, 3)
    assert ev["selection"]["best"] in range(config.train.seeds)


def test_finished_run_is_not_retrained(tiny_run, capsys):
    before = (tiny_run / "metrics.jsonl").read_text()
    assert main(["--preset", "tiny", "--run-dir", str(tiny_run), "--no-progress"]) == 0
    assert "is finished" in capsys.readouterr().out
    assert (tiny_run / "metrics.jsonl").read_text() == before


def test_skipped_step_leaves_the_state_unchanged():
    """A step whose loss is not finite is not applied."""
    config = _tiny()
    state = jax.tree.map(lambda a: a[0], eqx.filter(eqicl.init_ensemble(config), eqx.is_array))
    state = eqx.combine(state, eqicl.init_ensemble(config))
    bad = eqx.tree_at(
        lambda s: s.model.layers.p, state, state.model.layers.p.at[0, 0, 0].set(jnp.inf)
    )
    new, (loss, skipped) = eqicl.train_step(bad, jnp.asarray(0), config)
    assert bool(skipped) and not np.isfinite(float(loss))
    assert int(new.step) == int(bad.step) + 1
    for x, y in zip(_arrays(new.model), _arrays(bad.model), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("cap", ["hard", "soft"])
def test_loss_cap_closed_form(cap):
    """The capped training loss is the mean of min(l, c) or c·log(1 + l/c) over sequences,
    l = ½‖wᴸ − μ‖² computed independently here, in float64."""
    from eqicl._train import loss_fn

    task = eqicl.TaskConfig(d=4, n=9, sigma_max=2.0)
    cfg = eqicl.ModelConfig(kind="diag", layers=2, init="normal", init_scale=0.5)
    model = eqicl.init_transformer(jr.key(0), cfg, task, jnp.float64)
    batch = eqicl.sample_batch(jr.key(1), task, 64, jnp.float64)
    w = jax.vmap(model.implicit_weights)(batch.x, batch.y)[:, -1]
    mu = jax.vmap(eqicl.oracle_weights)(batch.x, batch.y, batch.sigma)
    per = 0.5 * np.sum((np.asarray(w) - np.asarray(mu)) ** 2, axis=1)
    c = float(np.median(per))  # half the sequences above the cap
    want = np.mean(np.minimum(per, c) if cap == "hard" else c * np.log1p(per / c))
    train = eqicl.TrainConfig(loss_clip=c, loss_cap=cap, formulation="tokens")
    np.testing.assert_allclose(float(loss_fn(model, batch, train)), want, rtol=1e-12)


def test_the_jitted_step_is_traced_once_per_chunk_length(monkeypatch):
    """train_loop compiles one program per chunk length and reuses it (STYLE 5): calls of
    10, 10, 10 and 5 steps trace the step twice, not four times."""
    from eqicl import _train

    step = _train.train_step

    def run(steps, max_traces):
        counted = eqx.debug.assert_max_traces(step, max_traces=max_traces)
        monkeypatch.setattr(_train, "train_step", counted)
        config = eqicl.preset("tiny", [f"train.steps={steps}", "train.seeds=1"])
        state = _train.train_loop(config, _train.init_ensemble(config))
        assert int(state.step[0]) == steps

    run(35, 2)
    with pytest.raises(RuntimeError, match="traced"):
        run(35, 1)
