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
