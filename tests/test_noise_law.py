"""A noise law of the user's own (`eqicl.NoiseLaw`): σ_τ = 4 with probability 0.1, else 0.5,
which no built-in kind expresses. Training (both samplers), evaluation, the baselines and the
units must all draw from it; a run directory must refuse it in one line."""

import dataclasses
import math

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqicl

F64 = jnp.float64


@dataclasses.dataclass(frozen=True)
class Bimodal(eqicl.NoiseLaw):
    low: float = 0.5
    high: float = 4.0
    p_high: float = 0.1

    def sample(self, key, batch, dtype):
        return jnp.where(jr.uniform(key, (batch,)) < self.p_high, self.high, self.low).astype(dtype)

    @property
    def mean_sigma2(self):
        return (1 - self.p_high) * self.low**2 + self.p_high * self.high**2

    @property
    def sigma_range(self):
        return self.high

    @property
    def label(self):
        return "bimodal"


TASK = eqicl.TaskConfig(d=4, n=9, noise=Bimodal())


def _share_high(sigma) -> float:
    sigma = np.asarray(sigma)
    assert set(np.unique(sigma).tolist()) == {0.5, 4.0}
    return float(np.mean(sigma == 4.0))


@pytest.mark.parametrize("sampler", ["tokens", "wishart"])
def test_training_and_test_sequences_draw_from_the_law(sampler):
    """sample_batch (evaluation, the token formulation) and both training samplers draw σ_τ
    from the law: only its two levels, the high one in 10 % of 20,000 sequences (4 se)."""
    from eqicl._fast import sample_stats

    tol = 4 * math.sqrt(0.1 * 0.9 / 20_000)
    batch = eqicl.sample_batch(jr.key(0), TASK, 20_000, F64)
    assert abs(_share_high(batch.sigma) - 0.1) < tol
    st = sample_stats(jr.key(1), TASK, 20_000, F64, sampler)
    assert abs(_share_high(st.sigma) - 0.1) < tol
    assert TASK.mean_sigma2 == pytest.approx(0.9 * 0.25 + 0.1 * 16, rel=1e-15)


def test_a_model_trains_and_is_evaluated_on_the_law():
    config = eqicl.Config(
        task=TASK, model=eqicl.ModelConfig(kind="diag", layers=2), train=eqicl.TrainConfig()
    )
    config = eqicl.override(
        config,
        [
            "train.steps=20",
            "train.steps_per_call=10",
            "train.batch=256",
            "train.seeds=1",
            "train.dtype=float64",
            "eval.sequences=400",
            "eval.chunk=400",
            "eval.tune_sequences=400",
            "eval.profile_points=2",
            "eval.profile_sequences=50",
            "eval.tail_sequences=400",
        ],
    )
    trainer = eqicl.Trainer(config)
    state = trainer.init()
    # The parameter units follow the law's E[σ²] (SPEC §8): s = sqrt(d + E σ²).
    assert state.model.layers.scale_s == pytest.approx(math.sqrt(4 + TASK.mean_sigma2))
    while int(state.step[0]) < config.train.steps:
        state, metrics = trainer.advance(state)
        assert all(math.isfinite(v) for v in metrics["loss"])
    model = eqicl.ensemble_member(state.model, 0)
    result = eqicl.evaluate(model, config)
    assert result["paper"]["model"] is None  # not a cell of the paper's table
    assert result["profile"]["sigma"][-1] == pytest.approx(4.0 * config.eval.profile_factor)
    assert {"constrr", "adarr", "tunedrr"} <= set(result["baselines"])
    assert math.isfinite(result["model"]["adjusted_exact"]["mean"])


def test_a_run_directory_refuses_the_law_in_one_line(tmp_path):
    config = eqicl.Config(task=TASK)
    with pytest.raises(eqicl.ConfigError, match=r"^task\.noise is a Bimodal .*config\.json"):
        eqicl.run(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing written


def test_an_unhashable_law_is_refused_in_one_line():
    @dataclasses.dataclass  # not frozen: eq without hash
    class Mutable(eqicl.NoiseLaw):
        sample = Bimodal.sample
        mean_sigma2 = Bimodal.mean_sigma2
        sigma_range = Bimodal.sigma_range
        high: float = 4.0

    with pytest.raises(eqicl.ConfigError, match="must be hashable"):
        eqicl.TaskConfig(noise=Mutable())
