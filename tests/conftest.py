import jax

# Tests check the maths in float64 with tight tolerances; promotions must be explicit.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
