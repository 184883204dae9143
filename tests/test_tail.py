"""The tail-aware estimator (eqicl._tail, SPEC §9): exact weights, bounded weights, unbiased
for closed-form expectations, and far more precise than plain sampling on a heavy tail."""

import math

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqicl
from eqicl._fast import sample_stats, sample_weighted_stats

F64 = jnp.float64
TASK = eqicl.TaskConfig(noise="uniform", sigma_max=2.0)
N_, D_ = TASK.n, TASK.d


def _gauss_logpdf(v, scale, axes):
    k = np.prod([v.shape[a] for a in axes])
    return -0.5 * k * math.log(2 * math.pi * scale**2) - np.sum(v**2, axis=axes) / (2 * scale**2)


@pytest.mark.parametrize("sampler", ["wishart", "tokens"])
def test_weights_are_the_density_ratio_and_bounded(sampler):
    """log f/q from the statistics equals the ratio of the Gaussian densities of the sampled
    x and w under the law and the mixture (shares realised in the batch)."""
    prop = eqicl.Proposal(
        x_scales=(1.0, 1.3, 2.0), w_scales=(1.0, 1.5, 1.0), shares=(0.4, 0.3, 0.3)
    )
    batch = 10
    # The token sampler exposes x and w; with scales the same key gives the same normals.
    c, b, _ = prop.scales(batch, F64)
    tok = eqicl.sample_batch(jr.key(3), TASK, batch, F64, x_scale=c, w_scale=b)
    x, w = np.asarray(tok.x), np.asarray(tok.w)
    counts = np.asarray(prop.counts(batch))
    log_f = _gauss_logpdf(x, 1.0, (1, 2)) + _gauss_logpdf(w, 1.0, (1,))
    log_qk = np.stack(
        [
            _gauss_logpdf(x, cx, (1, 2)) + _gauss_logpdf(w, cw, (1,))
            for cx, cw in zip(prop.x_scales, prop.w_scales, strict=True)
        ]
    )
    want = log_f - np.log(np.sum(counts[:, None] / batch * np.exp(log_qk - log_f), axis=0)) - log_f
    got = prop.log_weight(
        jnp.asarray(np.sum(x**2, axis=(1, 2))), jnp.asarray(np.sum(w**2, axis=1)), N_, D_
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-10)
    # Both samplers: weights never above 1 / (share of the task's own law).
    st, log_w = sample_weighted_stats(jr.key(4), TASK, 20_000, prop, F64, sampler)
    log_w = np.asarray(log_w)
    assert np.max(log_w) <= -math.log(0.4) + 1e-12  # shares[0] = 0.4 of 20,000: exact
    assert np.max(log_w) > -math.log(0.4) - 0.05  # typical sequences come close to the bound
    assert np.all(np.isfinite(np.asarray(st.s)))


NOISY = eqicl.Proposal(
    x_scales=(1.0, 1.2, 1.0),
    w_scales=(1.0, 1.0, 1.0),
    shares=(0.5, 0.25, 0.25),
    e_scales=(1.0, 1.0, 1.6),
)


def test_noise_scaling_weights_are_the_density_ratio():
    """With noise scales, log f/q also holds the ratio of the label noise's densities."""
    batch = 12
    c, b, a = NOISY.scales(batch, F64)
    tok = eqicl.sample_batch(jr.key(13), TASK, batch, F64, x_scale=c, w_scale=b, e_scale=a)
    x = np.asarray(tok.x)
    e = np.asarray(eqicl.noise_draws(jr.key(13), TASK, batch, F64, a))
    np.testing.assert_allclose(  # the noise it returns is the batch's
        np.asarray(tok.y),
        np.einsum("bnd,bd->bn", x, np.asarray(tok.w)) + np.asarray(tok.sigma)[:, None] * e,
        rtol=1e-13,
        atol=1e-13,
    )
    counts = np.asarray(NOISY.counts(batch))
    log_f = _gauss_logpdf(x, 1.0, (1, 2)) + _gauss_logpdf(e, 1.0, (1,))
    log_qk = np.stack(
        [
            _gauss_logpdf(x, cx, (1, 2)) + _gauss_logpdf(e, ca, (1,))
            for cx, ca in zip(NOISY.x_scales, NOISY.e_scales, strict=True)
        ]
    )
    want = -np.log(np.sum(counts[:, None] / batch * np.exp(log_qk - log_f), axis=0))
    got = NOISY.log_weight(
        jnp.asarray(np.sum(x**2, axis=(1, 2))),
        jnp.asarray(np.sum(np.asarray(tok.w) ** 2, 1)),
        N_,
        D_,
        jnp.asarray(np.sum(e**2, axis=1)),
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="sum_e2"):
        NOISY.log_weight(jnp.ones(3), jnp.ones(3), N_, D_)
    assert not eqicl.DEFAULT.scales_noise and eqicl.DEFAULT.e_scales == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("sampler", ["wishart", "tokens"])
def test_noise_scaling_proposals_are_unbiased(sampler):
    """E[f/q] = 1 and E λ = E Σy² = n(d + E σ²) under a proposal that scales the noise,
    each within 4 standard errors, on both samplers; and it reaches larger Σy²."""
    st, log_w = sample_weighted_stats(jr.key(14), TASK, 200_000, NOISY, F64, sampler)
    s = np.asarray(st.s)
    for values, want in ((np.ones(s.shape[-1]), 1.0), (s[D_, D_], N_ * (D_ + TASK.mean_sigma2))):
        r = eqicl.summarize(values, log_w)
        assert abs(r["mean"] - want) < 4 * r["se"] and r["se"] < 0.02 * want, (r, want)
    # the noise is heavier: the largest λ (Σ y²) is far beyond plain sampling's
    plain = np.asarray(sample_stats(jr.key(14), TASK, 200_000, F64, sampler).s)[D_, D_]
    assert np.max(s[D_, D_]) > 1.2 * np.max(plain)


def test_plain_proposal_draws_the_same_sequences():
    st = sample_stats(jr.key(5), TASK, 64, F64)
    st2, log_w = sample_weighted_stats(jr.key(5), TASK, 64, eqicl.PLAIN, F64)
    np.testing.assert_array_equal(np.asarray(st.s), np.asarray(st2.s))
    np.testing.assert_array_equal(np.asarray(log_w), np.zeros(64))


@pytest.mark.parametrize("sampler", ["wishart", "tokens"])
def test_weighted_means_are_unbiased_for_closed_forms(sampler):
    """Under the default proposal: E[f/q] = 1, E tr Σ = nd, E tr Σ² = nd(n + d + 1)
    (Wishart_d(n, I)), E λ = E Σ y² = n(d + σ_max²/3), each within 4 standard errors."""
    st, log_w = sample_weighted_stats(jr.key(6), TASK, 200_000, eqicl.DEFAULT, F64, sampler)
    s = np.asarray(st.s)
    sig = s[:D_, :D_]
    checks = {
        "weight": (np.ones(s.shape[-1]), 1.0),
        "tr": (np.trace(sig), N_ * D_),
        "tr2": (np.einsum("ijb,jib->b", sig, sig), N_ * D_ * (N_ + D_ + 1)),
        "lambda": (s[D_, D_], N_ * (D_ + TASK.mean_sigma2)),
    }
    for name, (values, want) in checks.items():
        r = eqicl.summarize(values, log_w)
        assert abs(r["mean"] - want) < 4 * r["se"], (name, r, want)
        assert r["se"] < 0.02 * want, (name, r)


def test_tail_estimate_of_a_heavy_tailed_expectation():
    """g = exp(t tr Σ) (1 − 2t)^(nd/2) has E g = 1 (tr Σ ~ χ²_nd) and a tail that plain
    sampling misses: the weighted estimate hits 1 within 4 standard errors, with a standard
    error under 1 %, far below the plain one on the same number of sequences."""
    t = 0.15
    out = {}
    for name, prop in (("plain", eqicl.PLAIN), ("tail", eqicl.DEFAULT)):
        st, log_w = sample_weighted_stats(jr.key(7), TASK, 200_000, prop, F64)
        tr = np.trace(np.asarray(st.s)[:D_, :D_])
        g = np.exp(t * tr + 0.5 * N_ * D_ * math.log(1 - 2 * t))
        out[name] = eqicl.summarize(g, None if prop.plain else log_w)
    tail, plain = out["tail"], out["plain"]
    assert abs(tail["mean"] - 1.0) < 4 * tail["se"] and tail["se"] < 0.01
    assert plain["se"] > 10 * tail["se"]
    assert plain["top_share"] > 0.3 > 0.05 > tail["top_share"]


def test_model_estimates_agree_with_plain_sampling_where_both_are_precise():
    """A 2-layer GD start (stable on every spectrum it meets) under plain sampling and under
    the proposal: the same expectation within 4 combined standard errors; and the plain
    estimate equals eqicl's exact loss on the same statistics."""
    task = eqicl.TaskConfig(noise="uniform", sigma_max=1.0)
    model = eqicl.init_transformer(jr.key(0), eqicl.ModelConfig(kind="diag", layers=2), task, F64)
    plain = eqicl.estimate(model, task, jr.key(1), 100_000, eqicl.PLAIN, chunk=40_000)
    tail = eqicl.estimate(model, task, jr.key(2), 100_000, eqicl.DEFAULT, chunk=40_000)
    assert len(plain) == len(tail) == 2
    for p, q in zip(plain, tail, strict=True):
        assert abs(p["mean"] - q["mean"]) < 4 * math.hypot(p["se"], q["se"])
        assert p["sequences"] == q["sequences"] == 100_000
    assert plain[-1]["ess"] == 100_000 and 40_000 < tail[-1]["ess"] < 100_000


def test_estimates_do_not_depend_on_the_model_set():
    """estimate_all scores every model on the same sequences: each model's numbers are those
    of estimate alone."""
    task = eqicl.TaskConfig(noise="categorical", sigma_set=(1.0, 3.0))
    a = eqicl.init_transformer(jr.key(0), eqicl.ModelConfig(kind="gdpp", layers=1), task, F64)
    b = eqicl.init_transformer(jr.key(1), eqicl.ModelConfig(kind="full", layers=2), task, F64)
    both = eqicl.estimate_all({"a": a, "b": b}, task, jr.key(3), 5_000, chunk=2_000)
    alone = eqicl.estimate(b, task, jr.key(3), 5_000, chunk=2_000)
    assert both["b"] == alone


def test_summary_tail_fields():
    losses = np.concatenate([np.full(1998, 1.0), [1000.0, 3000.0]])
    r = eqicl.summarize(losses)
    assert r["top_sequences"] == 2 and r["max"] == 3000.0
    assert r["top_share"] == pytest.approx(4000.0 / (1998.0 + 4000.0), rel=1e-12)
    assert r["se"] == pytest.approx(np.std(losses, ddof=1) / math.sqrt(2000), rel=1e-12)
    w = np.log(np.array([2.0, 0.5, 0.5, 1.0]))
    r = eqicl.summarize(np.array([1.0, 2.0, 3.0, 4.0]), w)
    assert r["mean"] == pytest.approx((2 + 1 + 1.5 + 4) / 4, rel=1e-12)
    assert r["ess"] == pytest.approx(16.0 / 5.5, rel=1e-12)
    bad = eqicl.summarize(np.array([1.0, np.inf]))
    assert not bad["finite"] and math.isnan(bad["top_share"]) and bad["mean"] == math.inf
    assert eqicl.summarize(np.array([1.0, np.nan]))["mean"] == math.inf
    # losses of 1e200 (squares overflow) and 1e307 (sums overflow): the statistics of the
    # same numbers scaled down, finite where the numbers are
    for big in (1e200, 1e307):
        v = np.array([1.0, 2.0, big, big])
        r = eqicl.summarize(v)
        small = eqicl.summarize(v / big)
        assert r["finite"] and math.isfinite(r["se"]) and math.isfinite(r["mean"])
        assert r["mean"] == pytest.approx(small["mean"] * big, rel=1e-12)
        assert r["se"] == pytest.approx(small["se"] * big, rel=1e-12)
        assert r["top_share"] == pytest.approx(small["top_share"], rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(x_scales=(1.2, 1.5), w_scales=(1.0, 1.0), shares=(0.5, 0.5)), "first component"),
        (dict(x_scales=(1.0, 0.5), w_scales=(1.0, 1.0), shares=(0.5, 0.5)), ">= 1"),
        (dict(x_scales=(1.0, 1.5), w_scales=(1.0, 1.0), shares=(0.5, 0.6)), "sum to 1"),
        (dict(x_scales=(1.0,), w_scales=(1.0, 1.0), shares=(1.0,)), "as many"),
    ],
)
def test_bad_proposals_are_refused(kwargs, message):
    with pytest.raises(eqicl.ConfigError, match=message):
        eqicl.Proposal(**kwargs)


def test_weighted_training_loss_is_unbiased_for_the_plain_one():
    """loss_fn on proposal-drawn statistics with their weights (no cap) has the expectation of
    the plain training loss: both estimates of E ½‖wᴸ − μ‖² agree within 4 combined se."""
    from eqicl._train import loss_fn

    task = eqicl.TaskConfig(noise="uniform", sigma_max=1.0)
    model = eqicl.init_transformer(jr.key(0), eqicl.ModelConfig(kind="diag", layers=2), task, F64)
    train = eqicl.TrainConfig(loss_clip=0.0, dtype="float64")
    vals = {}
    for name, prop in (("plain", eqicl.PLAIN), ("tail", eqicl.DEFAULT)):
        per = []
        for i in range(8):
            st, log_w = sample_weighted_stats(jr.key(10 + i), task, 10_000, prop, F64)
            per.append(float(loss_fn(model, st, train, None if prop.plain else log_w)))
        vals[name] = (np.mean(per), np.std(per, ddof=1) / math.sqrt(len(per)))
    (a, sa), (b, sb) = vals["plain"], vals["tail"]
    assert abs(a - b) < 4 * math.hypot(sa, sb) and sb < 0.05 * b


def test_training_with_a_proposal_runs_and_selects_by_the_tail(tmp_path):
    config = eqicl.preset(
        "tiny",
        [
            "train.proposal_x=1,1.5",
            "train.proposal_w=1,1",
            "train.proposal_shares=0.5,0.5",
            "train.seeds=2",
        ],
    )
    assert not config.train.proposal.plain
    result = eqicl.run(config, tmp_path / "run", echo=lambda *_: None)
    assert result["status"] == "ok"
    tail = result["model"]["tail"]
    assert tail["sequences"] == config.eval.tail_sequences and math.isfinite(tail["mean"])
    assert abs(tail["mean"] - result["model"]["adjusted_exact"]["mean"]) < 4 * math.hypot(
        tail["se"], result["model"]["adjusted_exact"]["se"]
    )


def test_a_proposal_needs_the_statistics_formulation():
    with pytest.raises(eqicl.ConfigError, match="formulation=stats"):
        eqicl.preset(
            "tiny",
            [
                "train.proposal_x=1,2",
                "train.proposal_w=1,1",
                "train.proposal_shares=0.5,0.5",
                "train.formulation=tokens",
            ],
        )
    with pytest.raises(eqicl.ConfigError, match="eval.proposal"):
        eqicl.preset("tiny", ["eval.proposal_shares=0.5,0.6"])


def test_reeval_scores_committed_weights_on_a_new_draw(tmp_path, capsys):
    """python -m analysis.reeval: every weights file of the selection scored with both
    estimators on the same sequences per noise setting; the CSV's verdicts follow from its
    numbers; bad input is one line."""
    import csv

    from analysis.reeval import bar, main
    from eqicl._sweep import Cell, cell_config, weights_path

    paper = tmp_path / "paper"
    for cell in (Cell("gdpp", 1, "0"), Cell("diag", 2, "0"), Cell("diag", 1, "{1;3}")):
        config = cell_config(cell, None, 1)
        model = eqicl.init_transformer(jr.key(0), config.model, config.task)
        eqicl.save_weights(model, weights_path(paper, cell))
    args = ["--paper-dir", str(paper), "--seed", "7", "--sequences", "3000", "--chunk", "1000"]
    assert main([*args, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "cells: 3" in out
    with open(paper / "reeval" / "seed7-n3000.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["layers"], r["noise"]) for r in rows] == [
        ("GD++", "1", "0"),
        ("DIAG", "2", "0"),
        ("DIAG", "1", "{1;3}"),
    ]
    for r in rows:
        below = float(r["tail"]) <= bar(float(r["paper"]))
        assert int(r["below_bar"]) == below
        assert int(r["holds"]) == (below and int(r["precise"]) and not int(r["carried"]))
        assert float(r["tail_se"]) > 0 and float(r["plain_se"]) > 0
    # the same model on the same draw: the 1-layer GD start of "0" in both rows' numbers
    again = tmp_path / "again"
    assert main([*args, "--no-progress", "--models", "gdpp", "--out", str(again)]) == 0
    with open(again.with_suffix(".csv")) as f:
        (one,) = list(csv.DictReader(f))
    assert one["plain"] == rows[0]["plain"] and one["tail"] == rows[0]["tail"]
    for bad, message in (
        (["--sequences", "1"], "--sequences must be"),
        (["--layers", "9"], "unknown layers"),
        (["--models", "full"], "no weights"),
        (["--recorded"], "takes no --seed"),
    ):
        code = main([*args, *bad])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    for bad, message in (
        (["--paper-dir", str(paper)], "give --seed"),
        (["--paper-dir", str(paper), "--recorded"], "no scored cells"),  # weights, no table
    ):
        code = main(bad)
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_score_a_model_and_the_baselines_on_ones_own_batch():
    """eqicl.score: on a fixed-σ task ConstRR's tuned λ is the oracle's σ² and its adjusted
    loss near 0; noiseless, OLS is exact (adjusted loss 0); the model's losses after every
    layer are its exact losses on that batch."""
    fixed = eqicl.TaskConfig(noise="fixed", sigma=1.0)
    batch = eqicl.sample_batch(jr.key(21), fixed, 20_000, F64)
    tune = eqicl.sample_batch(jr.key(22), fixed, 20_000, F64)
    r = eqicl.score(None, batch, tune_on=tune)
    assert r["tuned"].const_lambda == pytest.approx(1.0, rel=0.05)
    assert r["baselines"]["constrr"]["mean"] < 1e-3 * r["baselines"]["ols"]["mean"]
    assert "model" not in r
    clean = eqicl.sample_batch(
        jr.key(23), eqicl.TaskConfig(noise="uniform", sigma_max=0.0), 500, F64
    )
    assert eqicl.score(None, clean)["baselines"]["ols"]["mean"] < 1e-18
    config = eqicl.preset("tiny")
    model = eqicl.init_transformer(jr.key(0), config.model, config.task)
    small = eqicl.sample_batch(jr.key(24), config.task, 300, F64)
    got = eqicl.score(model, small)["model"]
    from eqicl._evaluate import cast

    want = np.asarray(eqicl.model_exact_losses(cast(model, F64), small, eqicl.spectral(small)))
    assert len(got) == config.model.layers
    np.testing.assert_allclose([g["mean"] for g in got], want.mean(axis=0), rtol=1e-12)
