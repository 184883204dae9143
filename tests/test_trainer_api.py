"""Training through the public API with parts of one's own: a layer class of the user's
(tests/test_custom_layer.py), an optax optimizer of the user's, through `eqicl.run` with its
checkpoints, divergence guard, metrics and evaluation. A run interrupted at step 20 and
resumed ends bitwise where the unbroken one ends."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_custom_layer import ScaledQuery
from test_reliability import SMALL, _like_the_cli

import eqicl
from eqicl import _run
from eqicl._checkpoint import restore_checkpoint

CONFIG = eqicl.preset(
    "tiny",
    [
        *SMALL,
        "train.formulation=tokens",  # the statistics formulation cannot compute ScaledQuery
        "train.dtype=float64",
        "train.steps=40",
        "train.checkpoint_every=20",
        "eval.tail_sequences=400",
    ],
)
RATE = 3e-3


def _init(key):
    diag = eqicl.init_transformer(key, CONFIG.model, CONFIG.task, jnp.float64)
    layers = diag.layers
    g = jnp.full((diag.num_layers,), 0.8, jnp.float64)
    custom = ScaledQuery(
        p=layers.p,
        q=layers.q,
        g=g,
        dim=layers.dim,
        scale_n=layers.scale_n,
        scale_s=layers.scale_s,
    )
    return eqicl.LinearTransformer(layers=custom, num_layers=diag.num_layers)


def _trainer():
    return eqicl.Trainer(
        CONFIG,
        init=_init,
        optimizer=optax.sgd(RATE, momentum=0.9),
        schedule=optax.constant_schedule(RATE),
    )


def _run_it(run_dir, monkeypatch, fault=""):
    monkeypatch.setenv("EQICL_FAULT", fault)
    lines = []
    with _like_the_cli():
        result = eqicl.run(CONFIG, run_dir, progress=False, echo=lines.append, trainer=_trainer())
    return result, lines


def _arrays(state):
    return [np.asarray(a) for a in jax.tree.leaves(eqx.filter(state, eqx.is_array))]


def test_a_users_model_and_optimizer_train_through_run(tmp_path, monkeypatch):
    whole, lines = _run_it(tmp_path / "whole", monkeypatch)
    assert whole["status"] == "ok", whole.get("reason")
    assert lines[0].startswith("training step: a trainer's own parts")
    like = _trainer().abstract()
    final = restore_checkpoint(tmp_path / "whole", CONFIG, like=like)
    assert isinstance(final.model.layers, ScaledQuery) and int(final.step[0]) == 40
    # The evaluation scored the selected member of the user's model, on the token path.
    best = eqicl.ensemble_member(final.model, whole["selection"]["best"])
    with _like_the_cli():
        again = eqicl.evaluate(best, CONFIG, baselines=False)
    np.testing.assert_allclose(
        whole["model"]["adjusted_exact"]["mean"],
        again["model"]["adjusted_exact"]["mean"],
        rtol=1e-12,
    )
    # The user's optimizer ran: g moved from its start.
    assert np.max(np.abs(np.asarray(final.model.layers.g) - 0.8)) > 1e-6
    metrics = [
        json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics[-1]["lr"] == [RATE] * CONFIG.train.seeds

    with pytest.raises(_run.Interrupted):
        _run_it(tmp_path / "broken", monkeypatch, "int@20")
    resumed, lines = _run_it(tmp_path / "broken", monkeypatch)
    assert any(line.endswith("from step 20") for line in lines)
    back = restore_checkpoint(tmp_path / "broken", CONFIG, like=like)
    for a, b in zip(_arrays(final), _arrays(back), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed["model"]["adjusted_exact"] == whole["model"]["adjusted_exact"]


def test_a_trainer_of_another_config_is_refused(tmp_path):
    other = eqicl.preset("tiny")
    with pytest.raises(ValueError, match="another config"):
        eqicl.run(other, tmp_path / "run", progress=False, trainer=_trainer())
    assert not (tmp_path / "run").exists()
