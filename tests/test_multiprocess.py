"""Multi-process training on one machine: JAX's multi-controller runtime with two processes
on 127.0.0.1, each with two forced host CPU devices (CPU collectives through gloo), every
process running the same `python -m eqicl.train` command. Checked: process 0 alone writes
the run directory and the result equals one process on the same four devices up to
round-off; a SIGKILL of one process, then a restart of both, resumes and ends at the same
result; a run stopped on two processes resumes on one process with one device.

XLA_FLAGS and the distributed runtime must be set before JAX initialises, so every run is a
subprocess; each has a timeout, so that a hang fails the test instead of blocking it."""

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import eqicl
from eqicl._run import TIMING_KEYS

SRC = str(pathlib.Path(eqicl.__file__).resolve().parents[1])
TIMEOUT = 300  # seconds for one launch; a tiny run takes well under a minute on 2 cores
# The tiny preset in float64, so that "up to round-off" can be tested tightly.
ARGS = ["--preset", "tiny", "--no-progress", "--set", "train.dtype=float64"]
# float64, 40 Adam steps of 2 seeds on 4 devices: across processes only the order of the
# gradient all-reduce changes (gloo's against XLA's in-process one).
ROUND_OFF = 1e-12
# One device against four: besides the order of the batch sum, the forward pass runs in
# eqicl's CPU kernel on one device and in XLA on a mesh (tests/test_sharding.py: 1e-10).
OTHER_DEVICES = 1e-10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLA_FLAGS", "EQICL_FAULT") and not k.startswith(("JAX_", "SLURM_", "OMPI_"))
    }
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    return {**env, **(extra or {})}


def _launch(
    run_dir: pathlib.Path,
    processes: int,
    devices: int,
    faults: dict[int, str] | None = None,
    args: tuple[str, ...] = (),
) -> list[subprocess.Popen]:
    """`processes` processes (each with `devices` forced CPU devices) running the same
    training command into `run_dir` (`args` added to it); `faults[i]` is process i's
    EQICL_FAULT."""
    command = [sys.executable, "-m", "eqicl.train", *ARGS, *args, "--run-dir", str(run_dir)]
    port = _free_port()
    procs = []
    for i in range(processes):
        extra = {"EQICL_FAULT": (faults or {}).get(i, "")}
        if processes > 1:
            extra |= {
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": str(processes),
                "JAX_PROCESS_ID": str(i),
            }
        procs.append(
            subprocess.Popen(
                command,
                env=_env(devices, extra),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _wait(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each process; all are killed if one overruns."""
    deadline = time.monotonic() + TIMEOUT
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[1][-2000:] for p in procs]
        pytest.fail(f"a training process hung for {TIMEOUT} s; stderr: {logs}")
    return out


def _train(run_dir, processes, devices, faults=None, ok=True, args=()):
    results = _wait(_launch(run_dir, processes, devices, faults, args))
    if ok:
        for i, (code, _, stderr) in enumerate(results):
            assert code == 0, f"process {i} exited with {code}: {stderr[-3000:]}"
    return results


def _state(run_dir: pathlib.Path, step: int) -> list[np.ndarray]:
    from eqicl._checkpoint import restore_exact, state_arrays

    config = eqicl.read_run_config(run_dir)
    return state_arrays(restore_exact(run_dir, config, step, "the one compared"))


def _relative(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(
        float(np.max(np.abs(x - y), initial=0.0) / (np.max(np.abs(y), initial=0.0) + 1e-300))
        for x, y in zip(a, b, strict=True)
    )


def _numbers(tree, skip=TIMING_KEYS) -> list[float]:
    """Every number of an eval.json in a fixed order (timings left out)."""
    if isinstance(tree, dict):
        return [v for k in sorted(tree) if k not in skip for v in _numbers(tree[k])]
    if isinstance(tree, list):
        return [v for x in tree for v in _numbers(x)]
    if isinstance(tree, bool) or not isinstance(tree, (int, float)):
        return []
    return [float(tree)]


def _eval_difference(a: pathlib.Path, b: pathlib.Path) -> float:
    ea, eb = (json.loads((d / "eval.json").read_text()) for d in (a, b))
    assert ea["status"] == eb["status"] == "ok"
    assert ea["selection"]["best"] == eb["selection"]["best"]
    x, y = np.asarray(_numbers(ea)), np.asarray(_numbers(eb))
    assert x.shape == y.shape
    same = (x == y) | (np.isnan(x) & np.isnan(y))
    scale = np.maximum(np.abs(x), np.abs(y))
    return float(np.max(np.where(same, 0.0, np.abs(x - y) / np.where(same, 1.0, scale))))


def _calls(run_dir: pathlib.Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pathlib.Path:
    """The same training in one process on four forced host devices."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    _train(run_dir, processes=1, devices=4)
    return run_dir


def test_two_processes_train_as_one_on_the_same_devices(tmp_path, reference):
    run_dir = tmp_path / "run"
    (code0, out0, err0), (code1, out1, err1) = _train(run_dir, processes=2, devices=2)
    # One writer: one metrics line per call, written by process 0 (every call on the four
    # devices of the two processes), the run directory's files and nothing else.
    calls = _calls(run_dir)
    assert [c["step"] for c in calls] == [10, 20, 30, 40], calls
    assert all(c["devices"] == 4 and c["processes"] == 2 for c in calls), calls
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoints",
        "config.json",
        "eval.json",
        "metrics.jsonl",
        "train.lock",
    ]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["20", "40"]
    assert "evaluating seed" in out0 and "evaluating seed" not in out1
    # Process 1 waited for process 0's evaluation and reports its eval.json.
    table = out0[out0.index("adjusted loss") :]
    assert out1.endswith(table), (out0, out1)
    # The result of one process on four devices, up to round-off.
    for step in (20, 40):
        assert _relative(_state(run_dir, step), _state(reference, step)) < ROUND_OFF
    assert _eval_difference(run_dir, reference) < ROUND_OFF


def test_sigkill_of_one_process_then_a_restart_of_all_resumes(tmp_path, reference):
    run_dir = tmp_path / "run"
    # Process 1 is SIGKILLed right after the call that reaches step 30 (checkpoint 20 exists);
    # process 0's next collective fails, and it stops at once with a one-line error.
    procs = _launch(run_dir, processes=2, devices=2, faults={1: "kill@30"})
    try:
        assert procs[1].wait(timeout=TIMEOUT) == -signal.SIGKILL, procs[1].communicate()[1]
        _, err0 = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGKILL)
            p.communicate(timeout=60)
    assert procs[0].returncode == 3, err0[-3000:]
    assert "error: process 0 lost the other processes" in err0, err0[-3000:]
    assert (run_dir / "checkpoints" / "20").is_dir()
    assert not (run_dir / "checkpoints" / "40").exists()
    assert not (run_dir / "eval.json").exists()

    (_, out0, _), (_, out1, _) = _train(run_dir, processes=2, devices=2)
    assert f"resuming {run_dir} from step 20" in out0 and "resuming" not in out1
    assert [c["step"] for c in _calls(run_dir)] == [10, 20, 30, 40]
    assert _relative(_state(run_dir, 40), _state(reference, 40)) < ROUND_OFF
    assert _eval_difference(run_dir, reference) < ROUND_OFF


def test_a_run_of_two_processes_resumes_on_one_device(tmp_path, reference):
    """The run's identity is its maths, not its hardware: stopped on 2 processes x 2 devices
    (a SIGINT to one process stops both after the same call, with a checkpoint), it resumes
    in one process on one device and ends where the unbroken run does, up to round-off."""
    run_dir = tmp_path / "run"
    results = _train(run_dir, processes=2, devices=2, faults={0: "int@20"}, ok=False)
    for code, _, stderr in results:
        assert code == 128 + signal.SIGINT, stderr[-3000:]
        assert "stopped at step 20 after saving a checkpoint" in stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["20"]

    [(_, out, _)] = _train(run_dir, processes=1, devices=1)
    assert f"resuming {run_dir} from step 20" in out
    assert "(1 device in 1 process now, 4 devices in 2 processes up to step 20: " in out, out
    calls = _calls(run_dir)
    assert [(c["step"], c["devices"], c["processes"]) for c in calls] == [
        (10, 4, 2),
        (20, 4, 2),
        (30, 1, 1),
        (40, 1, 1),
    ]
    assert _relative(_state(run_dir, 40), _state(reference, 40)) < OTHER_DEVICES
    assert _eval_difference(run_dir, reference) < OTHER_DEVICES


def test_a_rollback_is_taken_by_every_process(tmp_path):
    """The divergence guard across processes: seed 1's gradient is NaN at steps 22-24 (the
    fault is part of the computation, so every process has it); after the third skipped step
    the processes roll back together to checkpoint 20 with seed 1's learning rate halved,
    process 0 alone logs the rollback, and the run ends where one process on the same four
    devices ends."""
    fault, guard = "nan@22-24/1", ("--set", "train.max_skipped=3")
    one, two = tmp_path / "one", tmp_path / "two"
    _train(one, processes=1, devices=4, faults={0: fault}, args=guard)
    _train(two, processes=2, devices=2, faults={0: fault, 1: fault}, args=guard)
    for run_dir in (one, two):
        calls = _calls(run_dir)
        assert [c["step"] for c in calls] == [10, 20, 20, 30, 40], calls
        assert calls[2]["event"] == "rollback" and calls[2]["from_step"] == 30
        assert calls[2]["members"] == [1] and calls[-1]["lr_scale"] == [1.0, 0.5]
    assert _relative(_state(two, 40), _state(one, 40)) < ROUND_OFF
    assert _eval_difference(two, one) < ROUND_OFF


def test_a_refused_run_directory_stops_every_process(tmp_path):
    """Process 0 alone checks the run directory; when it refuses it, the other process hears
    why and stops too instead of waiting for it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("not a run")
    (code0, _, err0), (code1, _, err1) = _train(run_dir, processes=2, devices=1, ok=False)
    assert code0 == code1 == 2, (err0, err1)
    assert "is not empty and is not an eqicl run directory" in err0
    assert "error: process 0 stopped:" in err1 and "is not an eqicl run directory" in err1
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]
