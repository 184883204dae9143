"""Data parallelism: the same training on 1 and 4 (forced host) devices, seed ensembles
included, gives the same result up to round-off. XLA_FLAGS must be set before JAX
initialises, so the training runs in a subprocess."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    jax.config.update("jax_enable_x64", True)
    import equinox as eqx
    import jax.numpy as jnp
    import numpy as np
    import eqicl
    from eqicl._parallel import data_mesh
    from eqicl._train import init_ensemble, make_train_chunk, train_loop

    out = {"device_count": jax.device_count()}
    for form in ("stats", "tokens"):
        leaves = {}
        for dev in (1, 4):
            config = eqicl.preset("tiny", [f"train.devices={dev}", "train.dtype=float64",
                                           f"train.formulation={form}", "train.steps=20"])
            state = train_loop(config, init_ensemble(config))
            leaves[dev] = [np.asarray(x) for x in jax.tree.leaves(eqx.filter(state, eqx.is_array))]
        out[form] = max(
            float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-300))
            for a, b in zip(leaves[1], leaves[4])
        )
        out[form + "_exact_equal"] = all(np.array_equal(a, b) for a, b in zip(leaves[1], leaves[4]))
    # The 4-device step really is partitioned: each step's sampled batch lives on 4 devices.
    import jax.random as jr
    from eqicl._train import sample_train_data
    config = eqicl.preset("tiny", ["train.devices=4", "train.dtype=float64", "train.formulation=tokens"])
    mesh = data_mesh(config.train)
    with jax.set_mesh(mesh):
        data, _ = jax.jit(lambda k: sample_train_data(k, config))(jr.key(0))
    out["data_devices"] = len(data.x.sharding.device_set)
    out["data_spec"] = str(data.x.sharding.spec)
    out["mesh_size"] = mesh.size
    print("RESULT " + json.dumps(out))
    """
)


def test_four_devices_equal_one_device():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT ") :])
    assert out["device_count"] == 4 and out["mesh_size"] == 4
    assert out["data_devices"] == 4 and "data" in out["data_spec"], out
    # float64, 20 Adam steps of 2 seeds: only the order of the batch reduction differs.
    assert out["stats"] < 1e-10, out
    assert out["tokens"] < 1e-10, out


@pytest.mark.parametrize("devices", [3])
def test_batch_must_divide(devices):
    import eqicl

    with pytest.raises(eqicl.ConfigError, match="multiple of train.devices"):
        eqicl.preset("tiny", [f"train.devices={devices}"])


RESUME = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    jax.config.update("jax_enable_x64", True)
    import equinox as eqx
    import numpy as np
    import eqicl
    from eqicl import _run
    from eqicl._checkpoint import restore_checkpoint

    root = sys.argv[1]
    small = ["train.dtype=float64", "train.steps=40", "train.checkpoint_every=20"]
    one = eqicl.preset("tiny", [*small, "train.devices=1"])
    two = eqicl.preset("tiny", [*small, "train.devices=2"])
    quiet = dict(progress=False, echo=lambda _: None, evaluate=False)
    eqicl.run(one, root + "/whole", **quiet)
    os.environ["EQICL_FAULT"] = "int@20"  # SIGINT after step 20: checkpoint 20, then stop
    try:
        eqicl.run(one, root + "/moved", **quiet)
    except _run.Interrupted:
        pass
    os.environ["EQICL_FAULT"] = ""
    said = []
    eqicl.run(two, root + "/moved", progress=False, echo=said.append, evaluate=False)
    a, b = (
        [np.asarray(x) for x in jax.tree.leaves(eqx.filter(restore_checkpoint(
            __import__("pathlib").Path(root) / name, one), eqx.is_array))]
        for name in ("whole", "moved")
    )
    out = {
        "said": said,
        "diff": max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-300))
                    for x, y in zip(a, b)),
        "step": int(restore_checkpoint(__import__("pathlib").Path(root) / "moved", one).step[0]),
    }
    print("RESULT " + json.dumps(out))
    """
)


def test_a_run_resumes_on_another_number_of_devices(tmp_path):
    """train.devices is not part of a run's identity: a run that began on one device resumes
    on two, says so, and ends where the unbroken one-device run ends up to round-off."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "EQICL_FAULT")}
    proc = subprocess.run(
        [sys.executable, "-c", RESUME, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT ") :])
    assert out["step"] == 40
    assert out["said"][0].endswith("from step 20"), out
    assert out["said"][1].startswith("(train.devices=2 now, 1 when the run began"), out
    assert out["diff"] < 1e-10, out
