"""The noiseless GD++ loss as a function of the spectrum, against the forward pass."""

import jax.numpy as jnp
import jax.random as jr
import numpy as np

import eqicl
from analysis import _noiseless as nl

F64 = jnp.float64


def test_spectral_form_is_the_forward_pass():
    """A GD++ model's w^L along each eigenvector of Σ is t_L(e) · OLS, with
    1 − t_L = Π_l (1 + w_yx^l m_l² e), m ← m(1 + w_xx^l m² e); so its noiseless exact loss is
    ½ Σ_i (1 − t_L(e_i))² (v_iᵀw_τ)², and ½ Σ_i (1 − t_L(e_i))² on average over w_τ."""
    coef = np.array([[-0.011, -0.012], [-0.015, -0.02], [-0.05, -0.2], [0.0, -1.3]])
    model = eqicl.gdpp_transformer(coef, 10)
    task = eqicl.TaskConfig(noise="uniform", sigma_max=0.0)
    b = eqicl.sample_batch(jr.key(0), task, 64, F64)
    sp = eqicl.spectral(b)
    got = eqicl.model_exact_losses(model, b, sp)[:, -1]
    rem = nl.gdpp_remainder(jnp.asarray(coef), sp.e)
    want = 0.5 * jnp.sum((rem * sp.to_coords(b.w)) ** 2, axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-16)
    # Theorem 5.1's constants: the remainder is 1 − g^K(e/Λ₀)
    c = eqicl.theorem51(60.0, 3)
    e = jnp.linspace(0.1, 90.0, 50, dtype=F64)
    np.testing.assert_allclose(
        nl.gdpp_remainder(jnp.asarray(c.coefficients), e),
        1 - eqicl.theorem51_shrinkage(np.asarray(e), 60.0, 3),
        rtol=1e-12,
        atol=1e-14,
    )


def test_proposal_spectra_are_unbiased_for_wishart_moments():
    """Spectra drawn by eqicl's default proposal (eigenvalues scaled by c_k²) and weighted by
    f/q estimate the moments of the task's law: E tr Σ = nd and E tr Σ² = nd(n + d + 1) for
    Σ = XᵀX with n = 20 rows of N(0, I_10); every weight is at most 1/π_0; the first
    component's spectra are the plain ones."""
    n, d = 20, 10
    plain = nl.spectra(jr.key(3), 200_000)
    eigs, log_w = nl.proposal_spectra(plain, eqicl.DEFAULT, n=n)
    w = np.exp(log_w)
    k0 = eqicl.DEFAULT.counts(plain.shape[0])[0]
    np.testing.assert_array_equal(eigs[:k0], plain[:k0])
    assert w.max() <= 1 / eqicl.DEFAULT.shares[0] * (1 + 1e-12)
    for g, want in ((eigs.sum(-1), n * d), ((eigs**2).sum(-1), n * d * (n + d + 1))):
        est = eqicl.summarize(g, log_w)
        assert abs(est["mean"] - want) < 4 * est["se"], (est, want)
        assert est["se"] < 0.01 * want
    # the heavier components do reach what a plain draw of this size does not
    assert eigs[:, -1].max() > 1.4 * plain[:, -1].max()


def test_fit_objectives_reduce_to_the_plain_one():
    """With every log weight 0 the tail-aware objective is the plain mean, and α = 0 leaves
    only the typical draw: both fits are then the plain fit."""
    eigs = nl.spectra(jr.key(4), 2_000)
    coef0 = np.array([[-0.01, -0.03], [-0.05, -0.9]])
    base, _ = nl.fit(coef0, eigs, iterations=40)
    weighted, _ = nl.fit(coef0, eigs, iterations=40, log_weights=np.zeros(len(eigs)))
    other = nl.spectra(jr.key(5), 2_000)
    typical, _ = nl.fit(coef0, other, iterations=40, alpha=0.0, plain=eigs)
    np.testing.assert_allclose(weighted, base, rtol=1e-10)
    np.testing.assert_allclose(typical, base, rtol=1e-10)
    before = float(nl.score(coef0, eigs)["mean"])
    assert float(nl.score(base, eigs)["mean"]) < before


def test_noiseless_command_on_the_committed_weights(tmp_path, capsys):
    """`python -m analysis.noiseless` on the committed GD++ weights (small draws): the JSON,
    table and figure are written, every fit is scored on three draws, and bad input is a
    one-line error (exit 2) that writes nothing."""
    import json

    from analysis.noiseless import main

    out = tmp_path / "nl"
    assert main(["--out", str(out), "--alphas", "2", "--no-progress"]) == 2
    assert "--alphas" in capsys.readouterr().err
    assert not out.exists()
    args = ["--out", str(out), "--typical", "2000", "--large", "4000", "--alphas", "0,1"]
    assert main([*args, "--no-cells", "--no-progress"]) == 0
    result = json.loads((out / "noiseless.json").read_text())
    assert [r["layers"] for r in result["gdpp_tradeoff"]] == [3, 4, 5, 6, 7]
    for r in result["gdpp_tradeoff"]:
        assert [f["alpha"] for f in r["fits"]] == [0.0, 1.0]
        for f in [r["trained"], *r["fits"]]:
            assert f["plain"]["sequences"] == f["tail"]["sequences"] == 4000
            assert f["typical"]["sequences"] == 2000
        # α = 0 fits the typical draw: there it is no worse than the trained model
        assert r["fits"][0]["typical"]["mean"] <= r["trained"]["typical"]["mean"] * (1 + 1e-9)
    assert (out / "noiseless.png").stat().st_size > 0
    assert "| 7 | 2.65e-12 | α = 1 |" in (out / "noiseless.md").read_text()
