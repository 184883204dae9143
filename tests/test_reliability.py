"""Reliability: killed trainers resume bitwise, damaged checkpoints are skipped, the divergence
guard rolls back, and bad input is a one-line error with nothing written.

Faults are injected at fixed steps through EQICL_FAULT (see eqicl/_faults.py), so every run
of a test hits the same moment. Subprocess runs share a persistent compilation cache of
their own: after the first one, a tiny run costs seconds instead of a compile.
"""

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqicl
from eqicl import _checkpoint, _run
from eqicl.train import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Small evaluation: these tests check bookkeeping, not the paper's numbers.
SMALL = [
    "eval.sequences=400",
    "eval.tune_sequences=400",
    "eval.chunk=400",
    "eval.profile_points=2",
    "eval.profile_sequences=50",
    "train.select_sequences=64",
]


def _config(*overrides: str) -> eqicl.Config:
    return eqicl.preset("tiny", [*SMALL, *overrides])


def _cli(run_dir, *overrides: str) -> list[str]:
    args = ["--preset", "tiny", "--run-dir", str(run_dir), "--no-progress"]
    for o in [*SMALL, *overrides]:
        args += ["--set", o]
    return args


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("jax-cache")


def _train(jax_cache, run_dir, *overrides: str, fault: str = "") -> subprocess.CompletedProcess:
    """`python -m eqicl.train` on this checkout (not an installed eqicl) in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src")
    env["EQICL_COMPILATION_CACHE"] = str(jax_cache)  # not the user's cache
    env["EQICL_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "eqicl.train", *_cli(run_dir, *overrides)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _arrays(run_dir, config) -> list[np.ndarray]:
    state = _checkpoint.restore_checkpoint(pathlib.Path(run_dir), config)
    assert state is not None
    return _checkpoint.state_arrays(state)


def _result(run_dir) -> str:
    """eval.json without its timings, as text (NaN-safe comparison)."""
    data = json.loads((pathlib.Path(run_dir) / "eval.json").read_text())
    for key in _run.TIMING_KEYS:
        data.pop(key, None)
    return json.dumps(data, sort_keys=True)


def _metrics(run_dir) -> list[dict]:
    lines = (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for r in records:
        r.pop("seconds", None)
    return records


def _text(records) -> str:
    """JSON text, so that NaN (a skipped step's loss) compares equal to itself."""
    return json.dumps(records, sort_keys=True)


def _snapshot(path) -> dict | None:
    """Every file under `path` with its bytes (None if `path` does not exist)."""
    path = pathlib.Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return {".": path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _damage(checkpoint: pathlib.Path) -> pathlib.Path:
    """Overwrite the middle of the largest array file of a checkpoint with other bytes."""
    files = (p for p in (checkpoint / "state").rglob("*") if p.is_file())
    victim = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes((b + 1) % 256 for b in data[mid : mid + 16])
    victim.write_bytes(bytes(data))
    return victim


@pytest.fixture(scope="module")
def reference(jax_cache, tmp_path_factory) -> pathlib.Path:
    """An uninterrupted tiny run (checkpoints at 20 and 40)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = _train(jax_cache, run_dir)
    assert proc.returncode == 0, proc.stderr
    return run_dir


def test_killed_at_any_moment_resumes_bitwise(jax_cache, reference, tmp_path):
    """SIGKILL inside a checkpoint write and between checkpoints, SIGTERM (SIGINT: in the
    guard test below), then a damaged final checkpoint: each rerun of the same command
    resumes, and the end result is bitwise the uninterrupted one."""
    run_dir = tmp_path / "run"
    config = _config()

    p = _train(jax_cache, run_dir, fault="kill-in-save@20")
    assert p.returncode == -9
    # Orbax's temporary directory is all that is left of checkpoint 20.
    assert [q.name for q in (run_dir / "checkpoints").iterdir()] == ["20.orbax-checkpoint-tmp"]

    p = _train(jax_cache, run_dir, fault="kill@30")
    assert p.returncode == -9
    assert "20.orbax-checkpoint-tmp is a checkpoint whose writer was killed" in p.stderr
    assert "taking over" in p.stdout  # the lock of the killed trainer
    assert (run_dir / "corrupt" / "20.orbax-checkpoint-tmp").is_dir()
    assert _checkpoint.checkpoint_steps(run_dir) == [20]

    p = _train(jax_cache, run_dir, fault="term@30")
    assert p.returncode == 143, p.stderr
    assert "resuming" in p.stdout and "from step 20" in p.stdout
    assert "SIGTERM received: saving a checkpoint" in p.stdout
    assert _checkpoint.checkpoint_steps(run_dir) == [30, 20]  # saved on SIGTERM, off schedule

    p = _train(jax_cache, run_dir)
    assert p.returncode == 0, p.stderr
    assert "from step 30" in p.stdout
    assert _checkpoint.checkpoint_steps(run_dir) == [40, 20]  # 30 pruned: 40 supersedes it
    for got, want in zip(_arrays(run_dir, config), _arrays(reference, config), strict=True):
        np.testing.assert_array_equal(got, want)
    assert _result(run_dir) == _result(reference)
    assert _text(_metrics(run_dir)) == _text(_metrics(reference))

    # Damage the final checkpoint: it is skipped, training resumes from 20 and ends the same.
    (run_dir / "eval.json").unlink()
    _damage(run_dir / "checkpoints" / "40")
    p = _train(jax_cache, run_dir)
    assert p.returncode == 0, p.stderr
    assert "checkpoint 40" in p.stderr and "is damaged" in p.stderr
    assert "from step 20" in p.stdout
    assert (run_dir / "corrupt" / "40").is_dir()
    for got, want in zip(_arrays(run_dir, config), _arrays(reference, config), strict=True):
        np.testing.assert_array_equal(got, want)
    assert _result(run_dir) == _result(reference)


def test_second_trainer_is_refused_and_writes_nothing(jax_cache, reference):
    before = _snapshot(reference)
    lock = reference / _run.LOCK
    with open(lock, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write(f"{os.getpid()}\n")
        f.flush()
        held = _snapshot(reference)
        p = _train(jax_cache, reference)
        assert _snapshot(reference) == held
        f.truncate(0)
    assert p.returncode == 2
    assert p.stderr.splitlines()[-1] == (
        f"error: {reference} is in use by another trainer (pid {os.getpid()}); "
        "wait for it to finish or stop it"
    )
    assert _snapshot(reference) == before


def _fresh(run_dir, config, state=None, steps=(0,)) -> None:
    """A run directory holding `config` and checkpoints of `state` at `steps` (no training)."""
    path = _run.prepare_run_dir(run_dir, config)
    state = eqicl.init_ensemble(config) if state is None else state
    manager = _checkpoint.checkpoint_manager(path)
    for s in steps:
        _checkpoint.save_checkpoint(
            manager, eqx.tree_at(lambda t: t.step, state, jnp.full_like(state.step, s))
        )
    manager.close()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'"),
        (["training.lr=1"], "unknown config section 'training'"),
        (["lr=1"], "unknown config key 'lr'"),
        (["train.lr"], "is not of the form section.field=value"),
        (["train.lr=fast"], "train.lr must be a number"),
        (["train.steps=1.5"], "train.steps must be an integer"),
        (["model.kind=fulll"], "model.kind must be one of"),
        (["task.noise=categorical", "task.sigma_set=1,a"], "task.sigma_set must be a number"),
        (["seed=x"], "seed must be an integer"),
        (["train.steps=0"], "train.steps must be >= 1"),
        (["train.lr=nan"], "train.lr must be positive and finite"),
        (["train.lr=-1"], "train.lr must be positive and finite"),
        (["task.sigma_max=inf"], "task.sigma_max must be finite"),
        (["train.b2=1"], "train.b2 must be in [0, 1)"),
        (["train.lr_backoff=1.5"], "train.lr_backoff must be in (0, 1)"),
        (["train.explode_factor=0.5"], "train.explode_factor must be > 1"),
        (["train.max_skipped=-1"], "train.max_skipped must be >= 0"),
        (["train.checkpoint_every=15"], "must be a multiple of train.steps_per_call"),
    ],
)
def test_bad_config_is_a_one_line_error_writing_nothing(overrides, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_cli(run_dir, *overrides)) == 2
    assert message in _one_line_error(capsys)
    assert not run_dir.exists()


def test_bad_preset_and_fault_spec(tmp_path, capsys, monkeypatch):
    assert main(["--preset", "huge", "--run-dir", str(tmp_path / "a")]) == 2
    assert "unknown preset 'huge'" in _one_line_error(capsys)
    monkeypatch.setenv("EQICL_FAULT", "explode@3")
    assert main(_cli(tmp_path / "b")) == 2
    assert "cannot parse fault 'explode@3'" in _one_line_error(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_run_dir_with_another_config_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _fresh(run_dir, _config())
    before = _snapshot(run_dir)
    assert main(_cli(run_dir, "train.lr=0.5")) == 2
    err = _one_line_error(capsys)
    assert "holds a run with a different config (train.lr: 0.01 in the directory, 0.5 asked)" in err
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("file", "exists and is not a directory"),
        ("foreign", "is not empty and is not an eqicl run directory"),
        ("under a file", "cannot create"),
    ],
)
def test_a_directory_that_is_not_a_run_is_never_written(kind, message, tmp_path, capsys):
    target = tmp_path / "target"
    if kind == "foreign":
        target.mkdir()
        (target / "notes.txt").write_text("mine\n")
    else:
        target.write_text("notes\n")
    before = _snapshot(target)
    assert main(_cli(target / "run" if kind == "under a file" else target)) == 2
    assert message in _one_line_error(capsys)
    assert _snapshot(target) == before


def _write_config(path: pathlib.Path, text: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(text)


NOT_RUNS = {
    "missing": (lambda p: None, "no such directory"),
    "file": (lambda p: p.write_text("x"), "(a file)"),
    "empty": (lambda p: p.mkdir(), "no config.json"),
    "not json": (lambda p: _write_config(p, "{format: 2"), "is not valid JSON"),
    "old format": (
        lambda p: _write_config(p, '{"format": 1, "config": {}}'),
        "format 1, expected 2",
    ),
    "not an object": (lambda p: _write_config(p, "[1, 2]"), "format ?, expected 2"),
    "unknown key": (
        lambda p: _write_config(p, '{"format": 2, "config": {"train": {"lrr": 1}}}'),
        "unknown config key train.lrr",
    ),
    "bad value": (
        lambda p: _write_config(p, '{"format": 2, "config": {"model": {"layers": 0}}}'),
        "model.layers must be >= 1",
    ),
    "bad section": (
        lambda p: _write_config(p, '{"format": 2, "config": {"model": 3}}'),
        "config section model must be a JSON object",
    ),
}


@pytest.mark.parametrize("case", sorted(NOT_RUNS))
def test_reading_a_directory_that_is_not_a_run(case, tmp_path):
    """What analysis does with a directory: read_run_config and load_model refuse it with
    one line and write nothing."""
    make, message = NOT_RUNS[case]
    path = tmp_path / "dir"
    make(path)
    before = _snapshot(path)
    for read in (eqicl.read_run_config, eqicl.load_model):
        with pytest.raises(eqicl.RunDirError, match="^[^\n]*$") as info:
            read(path)
        assert message in str(info.value)
    assert _snapshot(path) == before


def test_run_without_checkpoint_and_bad_member(tmp_path):
    path = _run.prepare_run_dir(tmp_path / "run", _config())
    with pytest.raises(eqicl.RunDirError, match="has no intact checkpoint"):
        eqicl.load_model(path)
    _fresh(path, _config())
    with pytest.raises(eqicl.RunDirError, match=r"member must be an integer in \[0, 2\)"):
        eqicl.load_model(path, member=2)
    model, _ = eqicl.load_model(path, member=1)
    assert model.layers.p.shape == (2, 1, 2)  # layers, heads, (p_x, p_y)


def test_checkpoint_of_another_model_shape(tmp_path, capsys):
    """config.json asks for 3 layers, the checkpoint holds 2: a clear error, from
    load_model and from the trainer, and nothing written."""
    run_dir = tmp_path / "run"
    _fresh(run_dir, _config())
    data = json.loads((run_dir / "config.json").read_text())
    data["config"]["model"]["layers"] = 3
    (run_dir / "config.json").write_text(json.dumps(data))
    before = _snapshot(run_dir)
    with pytest.raises(eqicl.RunDirError, match="^[^\n]*$") as info:
        eqicl.load_model(run_dir)
    assert "holds a training state of another shape" in str(info.value)
    assert "float32[2, 2, 1, 2] saved, float32[2, 3, 1, 2] expected" in str(info.value)
    assert main(_cli(run_dir, "model.layers=3")) == 2
    assert "holds a training state of another shape" in _one_line_error(capsys)
    assert _snapshot(run_dir) == before


def _break_meta(step_dir: pathlib.Path) -> None:
    shutil.rmtree(step_dir / "meta")


def _truncate_all(step_dir: pathlib.Path) -> None:
    for p in (step_dir / "state").rglob("*"):
        if p.is_file():
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_damage, _break_meta, _truncate_all])
def test_damaged_checkpoint_is_skipped_with_a_warning(damage, tmp_path):
    config = _config()
    state = eqicl.init_ensemble(config)
    _fresh(tmp_path / "run", config, state, steps=(20, 40))
    run_dir = tmp_path / "run"
    damage(run_dir / "checkpoints" / "40")
    warnings: list[str] = []
    restored = _checkpoint.restore_checkpoint(run_dir, config, warn=warnings.append)
    assert int(restored.step[0]) == 20
    for got, want in zip(
        _checkpoint.state_arrays(restored.model), _checkpoint.state_arrays(state.model), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    assert len(warnings) == 1 and "checkpoint 40" in warnings[0] and "is damaged" in warnings[0]
    assert (run_dir / "checkpoints" / "40").is_dir()  # read-only: only a run moves it aside
    _checkpoint.restore_checkpoint(run_dir, config, quarantine=True, warn=warnings.append)
    assert _checkpoint.checkpoint_steps(run_dir) == [20] and (run_dir / "corrupt" / "40").is_dir()


def test_no_checkpoint_holds_a_non_finite_value(tmp_path):
    config = _config()
    state = eqicl.init_ensemble(config)
    bad = eqx.tree_at(
        lambda s: s.model.layers.p, state, state.model.layers.p.at[0, 0, 0, 0].set(jnp.inf)
    )
    path = _run.prepare_run_dir(tmp_path / "run", config)
    manager = _checkpoint.checkpoint_manager(path)
    with pytest.raises(ValueError, match="non-finite"):
        _checkpoint.save_checkpoint(manager, bad)
    manager.close()
    assert _checkpoint.checkpoint_steps(path) == []


# ----------------------------------------------------------------------------------------------
# The divergence guard, in process (the fault hooks act on the jitted step).

GUARD = ["train.max_skipped=3"]


def _run_in_process(run_dir, config, monkeypatch, fault: str = "", evaluate: bool = False):
    monkeypatch.setenv("EQICL_FAULT", fault)
    lines: list[str] = []
    with _like_the_cli():
        result = eqicl.run(
            config, run_dir, progress=False, echo=lines.append, warn=lines.append, evaluate=evaluate
        )
    return result, lines


@contextlib.contextmanager
def _like_the_cli():
    """Promotion rules of the command line. conftest makes them strict for the maths tests,
    but optax's bias correction mixes float and int32 and the evaluation broadcasts ranks."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


def test_guard_rolls_back_with_a_smaller_learning_rate(tmp_path, monkeypatch):
    """Seed 1's gradient is NaN at steps 22-24: those steps are skipped, and at the third the
    ensemble returns to checkpoint 20 with seed 1's learning rate halved, while seed 0 replays
    its steps exactly. Seed 0's loss is multiplied by 1e6 at steps 51-55: the call ending at
    60 is 1e5 times its running median, and the ensemble returns to checkpoint 40. A run
    interrupted in the call that rolls back resumes into the same rollbacks and end state.
    (One run exercises both triggers: compiling the step dominates the cost.)"""
    config = _config(*GUARD, "train.steps=60")
    faults = "nan@22-24/1,big@51-55/0"
    result, lines = _run_in_process(tmp_path / "hit", config, monkeypatch, faults)
    assert result == {"status": "trained", "steps": 60}
    rolled = [line for line in lines if "rolling back" in line]
    assert rolled[0] == (
        "step 30: seed 1: 3 non-finite steps skipped since the last checkpoint; rolling back "
        "to step 20 with the learning rate x 0.5 (rollback 1 of at most 5)"
    )
    assert rolled[1].startswith("step 60: seed 0: loss ") and "x its running median" in rolled[1]
    assert rolled[1].endswith(
        "rolling back to step 40 with the learning rate x 0.5 (rollback 1 of at most 5)"
    )
    assert len(rolled) == 2

    metrics = _metrics(tmp_path / "hit")
    # A rollback drops the abandoned calls' lines; its event line holds their step and loss.
    assert [r["step"] for r in metrics] == [10, 20, 20, 30, 40, 40, 50, 60]
    event, replayed = metrics[2], metrics[3]
    assert event["event"] == "rollback" and event["from_step"] == 30 and event["members"] == [1]
    assert event["lr_scale"] == [1.0, 0.5] and event["rollbacks"] == [0, 1]
    assert replayed["skipped"] == [0, 0] and replayed["lr_scale"] == [1.0, 0.5]
    # The logged rate is the one each seed used: the schedule's times its lr_scale.
    assert replayed["lr"][1] == 0.5 * replayed["lr"][0] > 0
    assert math.isnan(event["loss"][1]) and math.isfinite(replayed["loss"][1])
    assert replayed["loss"][0] == event["loss"][0]  # seed 0: the same steps again, bitwise
    event = metrics[5]
    assert event["event"] == "rollback" and event["from_step"] == 60 and event["members"] == [0]
    assert event["loss"][0] > 1e4 * metrics[4]["loss"][0]
    assert metrics[7]["lr_scale"] == [0.5, 0.5]
    assert metrics[7]["loss"][0] < 10 * metrics[4]["loss"][0]
    final = _checkpoint.restore_checkpoint(tmp_path / "hit", config)
    assert np.asarray(final.lr_scale).tolist() == [0.5, 0.5]
    assert np.asarray(final.rollbacks).tolist() == [1, 1]

    # SIGINT arrives in the call that triggers the first rollback; the rerun re-derives both.
    with pytest.raises(_run.Interrupted):
        _run_in_process(tmp_path / "stopped", config, monkeypatch, f"{faults},int@30")
    _, lines = _run_in_process(tmp_path / "stopped", config, monkeypatch, faults)
    assert lines[0].startswith("resuming") and lines[0].endswith("from step 20")
    assert _text(_metrics(tmp_path / "stopped")) == _text(metrics)
    for got, want in zip(
        _arrays(tmp_path / "stopped", config), _arrays(tmp_path / "hit", config), strict=True
    ):
        np.testing.assert_array_equal(got, want)


def test_persistent_divergence_fails_the_run(tmp_path, monkeypatch, capsys):
    """Every step from 12 on is NaN whatever the learning rate: after max_rollbacks the seeds
    are given up and the run is reported as failed, with a non-zero exit."""
    monkeypatch.setenv("EQICL_FAULT", "nan-always@12-40")
    run_dir = tmp_path / "run"
    with _like_the_cli():
        assert main(_cli(run_dir, *GUARD, "train.max_rollbacks=1")) == 1
    out = capsys.readouterr().out
    assert "rolling back to step 0 with the learning rate x 0.5 (rollback 1 of at most 1)" in out
    assert "given up after 1 rollbacks" in out
    assert "FAILED: every seed diverged" in out
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["status"] == "failed" and "model" not in result
    assert _checkpoint.checkpoint_steps(run_dir) == []  # never a checkpoint of a diverged state


def test_model_with_non_finite_predictions_is_reported_failed(tmp_path):
    """Finite but huge weights overflow in the forward pass: the run fails, not a number."""
    config = _config("model.layers=3", "model.init=normal", "model.init_scale=1e30")
    state = eqicl.init_ensemble(config)
    path = _run.prepare_run_dir(tmp_path / "run", config)
    with _like_the_cli():
        result = _run.finish(config, path, state, echo=lambda _: None)
    assert result["status"] == "failed" and "non-finite predictions" in result["reason"]
    assert "model" not in result
    assert json.loads((path / "eval.json").read_text())["status"] == "failed"
    assert _run.summary_table(config, result).startswith("FAILED:")


def test_explosion_needs_the_floor_too():
    """A call's mean loss 20x its running median is an explosion only above explode_floor:
    near a tiny optimum (noiseless tasks) such spikes are noise."""
    from eqicl._run import _guard_reasons
    from eqicl._train import init_ensemble

    config = eqicl.preset("tiny", ["train.seeds=1"])
    state = init_ensemble(config)

    def reasons(median, loss, floor):
        train = dataclasses.replace(config.train, explode_floor=floor)
        recent = np.full((1, state.recent.shape[1]), median, np.float64)
        st = eqx.tree_at(lambda s: s.recent, state, jnp.asarray(recent, state.recent.dtype))
        return _guard_reasons(st, {"loss": [loss]}, train)

    assert reasons(1e-3, 2e-2, 0.1) == {}
    assert 0 in reasons(1e-3, 2e-2, 0.0)
    assert 0 in reasons(0.05, 1.0, 0.1)
    assert reasons(0.05, 0.4, 0.1) == {}
