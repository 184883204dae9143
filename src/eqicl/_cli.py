"""Process set-up shared by the command-line entry points."""

import os
import pathlib


def setup_jax() -> None:
    """x64 on (evaluation resolves losses down to 1e-12; training keeps train.dtype) and a
    persistent compilation cache, so a resumed run, a sweep's next cell or a rerun does not
    compile the same programs again (XLA:CPU takes seconds for each sampler). Set
    EQICL_COMPILATION_CACHE to a directory to move the cache, or to "off" to disable it."""
    import jax

    jax.config.update("jax_enable_x64", True)
    where = os.environ.get("EQICL_COMPILATION_CACHE", "")
    if where.lower() == "off":
        return
    path = pathlib.Path(where) if where else pathlib.Path.home() / ".cache" / "eqicl" / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # a read-only home: run without the cache
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
