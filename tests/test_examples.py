"""examples/custom_study.py, run as a user runs it (a script outside the package): its own
layer class and noise law trained through eqicl.run with checkpoints, scored, read out."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # trains and evaluates in a subprocess: about a minute on 2 cores
def test_the_custom_study_runs_and_agrees_with_the_token_equation(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EQICL_FAULT"}
    env["PYTHONPATH"] = str(ROOT / "src")
    args = [sys.executable, str(ROOT / "examples" / "custom_study.py"), str(tmp_path / "run")]
    args += ["--steps", "50", "--sequences", "1000"]
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    # eqicl.score (token route for this layer class) equals the token equation by hand.
    assert abs(out["score_on_2000"] - out["token_equation_on_2000"]) <= 1e-10 * abs(
        out["token_equation_on_2000"]
    )
    assert any(abs(g - 1.0) > 1e-4 for g in out["learned_g"])  # the user's parameter trained
    assert {"tunedrr", "adarr", "constrr"} <= set(out["test"]["baselines"])
    assert sorted(q.name for q in (tmp_path / "run" / "checkpoints").iterdir()) == ["50"]
