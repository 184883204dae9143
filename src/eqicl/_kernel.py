"""The CPU kernel (`_kernel.cc`): the statistics formulation's forward and backward pass as an
XLA FFI custom call, compiled on first use with the system C++ compiler.

The kernel computes exactly what `eqicl._fast.final_weights` / `layer_weights` compute (the
tests compare them in float64), about an order of magnitude faster on CPU, because it runs a
tile of one SIMD register's sequences per instruction (16 float32 or 8 float64 with
AVX-512, half that with AVX2) and keeps a tile's whole forward and backward pass in cache,
where XLA-CPU runs batches of 11×11 products at a few GFLOP/s.

It is used only where it applies: on the CPU backend, on a single device, when it compiled.
Everything else (GPUs, a device mesh, no compiler, `EQICL_KERNEL=off`) runs the XLA
formulation with the same results. The compiled library is cached in
`~/.cache/eqicl/kernels/` (`EQICL_KERNEL_CACHE` moves it), keyed by the source, the compiler,
the flags, the CPU and jaxlib's version, so a change to any of them recompiles.
"""

import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np
from jaxtyping import Array, Float

from ._model import LinearTransformer
from ._parallel import num_devices

SOURCE = pathlib.Path(__file__).with_name("_kernel.cc")
FLAGS = (
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-pthread",
    "-w",
)
_FORWARD, _BACKWARD, _SAMPLE, _POSTERIOR = (
    "eqicl_forward",
    "eqicl_backward",
    "eqicl_sample",
    "eqicl_posterior",
)

_lock = threading.Lock()
_status: dict = {"tried": False, "ok": False, "reason": "not loaded yet"}


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("EQICL_KERNEL_CACHE")
    if root:
        return pathlib.Path(root)
    return pathlib.Path.home() / ".cache" / "eqicl" / "kernels"


def _compile(compiler: str) -> pathlib.Path:
    include = jax.ffi.include_dir()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    digest = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        " ".join(FLAGS).encode(),
        version.encode(),
        jaxlib.version.__version__.encode(),  # what jax.lib.__version__ reads
        _cpu_signature().encode(),
    ):
        digest.update(part)
    path = _cache_dir() / f"libeqicl_kernel-{digest.hexdigest()[:16]}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target, then rename: a concurrent or interrupted build never leaves a
    # half-written library under the final name.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o", tmp],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load() -> bool:
    """Compile (once) and register the kernel; False, with `reason()` saying why, if it cannot
    be used here. Thread-safe; tries only once per process."""
    with _lock:
        if _status["tried"]:
            return _status["ok"]
        _status["tried"] = True
        if os.environ.get("EQICL_KERNEL", "on").lower() in ("off", "0", "no", "false"):
            _status["reason"] = "turned off by EQICL_KERNEL"
            return False
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            _status["reason"] = f"no C++ compiler ({compiler!r} not found; set CXX)"
            return False
        try:
            import ctypes

            lib = ctypes.cdll.LoadLibrary(str(_compile(compiler)))
            jax.ffi.register_ffi_target(
                _FORWARD, jax.ffi.pycapsule(lib.EqiclForward), platform="cpu"
            )
            jax.ffi.register_ffi_target(
                _BACKWARD, jax.ffi.pycapsule(lib.EqiclBackward), platform="cpu"
            )
            jax.ffi.register_ffi_target(_SAMPLE, jax.ffi.pycapsule(lib.EqiclSample), platform="cpu")
            jax.ffi.register_ffi_target(
                _POSTERIOR, jax.ffi.pycapsule(lib.EqiclPosterior), platform="cpu"
            )
        except Exception as err:  # noqa: BLE001 - any failure means: use the XLA path
            # Not a warning: the training CLI prints which path runs (`describe`).
            _status["reason"] = f"could not build the kernel: {err}"
            return False
        _status["ok"], _status["reason"] = True, "ok"
        return True


def reason() -> str:
    return _status["reason"]


def _not_used(devices: int) -> str | None:
    """Why the statistics formulation runs in XLA rather than in the kernel on `devices`
    devices (None: the kernel runs). The one rule `usable` applies and `describe` words."""
    if jax.default_backend() != "cpu":
        return f"XLA on {jax.default_backend()}"
    if devices > 1:  # the custom call does not partition
        return "XLA, sharded over the device mesh"
    if not load():
        return f"XLA; CPU kernel not used: {reason()}"
    return None


def describe(train) -> str:
    """Which implementation a training run with these settings (a TrainConfig) takes."""
    if train.formulation == "tokens":
        return "the paper's token equation (XLA)"
    why = _not_used(num_devices(train))
    return f"statistics formulation ({why or 'eqicl CPU kernel'})"


def usable() -> bool:
    """True when the kernel applies to the computation being traced: CPU backend, no device
    mesh of more than one device, and the kernel loaded. Every computation that can take
    the kernel (training and evaluation alike) asks this, in eqicl._fast."""
    mesh = jax.sharding.get_abstract_mesh()
    return _not_used(1 if mesh.empty else mesh.size) is None


def sampler_usable() -> bool:
    """True when the kernel's sampler applies: the CPU backend and the kernel loaded. Unlike
    the forward pass it also runs under a device mesh (XLA runs the custom call replicated,
    then shards its output), so 1 and N CPU devices train on the same sequences."""
    return jax.default_backend() == "cpu" and load()


# ---------------------------------------------------------------------------------------------
# The model as the kernel's operands.


def operands(
    model: LinearTransformer,
) -> tuple[int, Float[Array, "L H D D"], Float[Array, "L H D D"]]:
    """(mode, p, q): FULL gives its P_k, Q_k in paper units (mode 0); DIAG and GD++ the
    matrix W with Tˡ = W ⊙ Sˡ (mode 1, q unused). The layer class decides
    (`AbstractLinearAttention.kernel_operands`)."""
    return model.layers.kernel_operands()


def _forward(s, p, q, mode: int, all_layers: bool):
    big_d, batch = s.shape[0], s.shape[-1]
    shape = (p.shape[0], big_d - 1, batch) if all_layers else (big_d - 1, batch)
    call = jax.ffi.ffi_call(
        _FORWARD, jax.ShapeDtypeStruct(shape, s.dtype), vmap_method="sequential"
    )
    return call(s, p, q, mode=np.int64(mode), all_layers=np.int64(all_layers))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _final(s, p, q, mode):
    return _forward(s, p, q, mode, False)


def _final_fwd(s, p, q, mode):
    return _forward(s, p, q, mode, False), (s, p, q)


def _final_bwd(mode, res, g):
    s, p, q = res
    call = jax.ffi.ffi_call(
        _BACKWARD,
        (
            jax.ShapeDtypeStruct(s.shape, s.dtype),
            jax.ShapeDtypeStruct(p.shape, p.dtype),
            jax.ShapeDtypeStruct(q.shape, q.dtype),
        ),
        vmap_method="sequential",
    )
    return tuple(call(s, p, q, g.astype(s.dtype), mode=np.int64(mode)))


_final.defvjp(_final_fwd, _final_bwd)


def final_weights(
    model: LinearTransformer, s: Float[Array, "D D batch"]
) -> Float[Array, "d batch"]:
    """wᴸ of every sequence from its statistics S⁰ (batch last); differentiable in the model
    and in S⁰. Requires `load()`."""
    mode, p, q = operands(model)
    p, q = p.astype(s.dtype), q.astype(s.dtype)
    return _final(s, p, q, mode)


def layer_weights(
    model: LinearTransformer, s: Float[Array, "D D batch"]
) -> Float[Array, "layers d batch"]:
    """wˡ after every layer (forward only, not differentiable). Requires `load()`."""
    mode, p, q = operands(model)
    return _forward(
        s,
        jax.lax.stop_gradient(p).astype(s.dtype),
        jax.lax.stop_gradient(q).astype(s.dtype),
        mode,
        True,
    )


def sample_wishart(key, n: int, big_d: int, batch: int, extra: int, dtype):
    """(Z, normals): Z ~ Wishart_D(n, I) of every sequence, (D, D, batch), distributed as
    Σ_{j=1}^{n} z_j z_jᵀ with z_j ~ N(0, I_D) but drawn by Bartlett's decomposition for n ≥ D
    (cost independent of n); and `extra` standard normals per sequence, (extra, batch).
    Deterministic in `key` (a JAX key), independent of the thread count. Requires `load()`."""
    bits = jax.random.bits(key, (2,), jnp.uint32)
    call = jax.ffi.ffi_call(
        _SAMPLE,
        (
            jax.ShapeDtypeStruct((big_d, big_d, batch), dtype),
            jax.ShapeDtypeStruct((extra, batch), dtype),
        ),
        vmap_method="sequential",
    )
    return call(bits, n=np.int64(n))


def posterior_mean(
    s: Float[Array, "D D batch"], sigma: Float[Array, " batch"]
) -> Float[Array, "d batch"]:
    """μ = (Σ + σ²I)⁻¹ α of every sequence from its statistics (Cholesky per sequence, in
    float64 whatever the dtype; not differentiable). Requires `load()`."""
    call = jax.ffi.ffi_call(
        _POSTERIOR,
        jax.ShapeDtypeStruct((s.shape[0] - 1, s.shape[-1]), s.dtype),
        vmap_method="sequential",
    )
    return call(jax.lax.stop_gradient(s), jax.lax.stop_gradient(sigma.astype(s.dtype)))
