"""What a config needs of the machine, checked before anything is written.

A config whose arrays cannot fit in memory used to be accepted, write its run directory, and
be killed (or fail) hours later, on every rerun again. `check_resources` refuses it at once,
with the estimate. The estimate is deliberately rough (it counts the large arrays of each
phase: the training batch with the activations its backward pass keeps, the selection,
tuning, test and profile sequences, and the per-sequence losses evaluation keeps) and errs
on the generous side: it is meant to catch configs off by orders of magnitude, not to
budget memory.
"""

import os

from ._config import Config, ConfigError

_F64 = 8


def machine_memory() -> int:
    """Bytes of memory this process may use: physical memory, or the cgroup limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def memory_estimate(config: Config) -> dict[str, int]:
    """Bytes of the largest arrays of each phase of a run (see the module docstring)."""
    t, m, tr, ev = config.task, config.model, config.train, config.eval
    d, n, D = t.d, t.n, t.d + 1
    width = 8 if tr.dtype == "float64" else 4
    tokens = (n + 1) * D  # one sequence's tokens
    stats = D * D  # one sequence's context statistics
    per_train = stats * (m.layers + 4)
    if tr.formulation == "tokens":
        per_train += tokens * (m.layers + 2)
    elif tr.sampler == "tokens":
        per_train += tokens
    # Evaluation: tokens, the eigendecomposition (d x d) and every layer's weights (d each).
    per_eval = tokens + d * d + (m.layers + 8) * d
    return {
        "training batch": tr.seeds * tr.batch * per_train * width,
        # a chunk at a time, keeping every member's per-sequence losses of both draws
        "seed selection": min(ev.chunk, tr.select_sequences) * per_eval * _F64
        + 2 * tr.select_sequences * (tr.seeds * m.layers + 1) * _F64,
        "baseline tuning": ev.tune_sequences * (per_eval + 64) * _F64,
        "test sequences": min(ev.chunk, ev.sequences) * per_eval * _F64
        # the per-sequence losses of every layer and baseline, kept for the standard errors
        + ev.sequences * 3 * (m.layers + 8) * _F64,
        "profile": ev.profile_sequences * per_eval * _F64,
    }


# The share of the machine's memory a run may plan for: the estimate counts the largest
# arrays only, and XLA's working space, the Python process and the system need the rest.
USABLE = 0.75


def check_resources(config: Config, available: int | None = None) -> None:
    """ConfigError (one line, with the estimate) if a phase of `config` needs more than
    `USABLE` of the machine's memory (`machine_memory()` unless `available` is given)."""
    available = machine_memory() if available is None else available
    need = memory_estimate(config)
    phase = max(need, key=need.__getitem__)
    if need[phase] > USABLE * available:
        raise ConfigError(
            f"this config needs about {_size(need[phase])} of memory for its {phase}, "
            f"more than {USABLE:.0%} of this machine's {_size(available)}; lower its size "
            "(train.batch, train.seeds, task.d, task.n, eval.sequences, ...)"
        )


def _size(b: float | int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if b < 1024 or unit == "PiB":
            return f"{b:.3g} {unit}"
        b /= 1024
    raise AssertionError  # pragma: no cover


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (/proc/cpuinfo, else `platform.processor()`), for the machine
    line beside measured figures; on x86 with its family, model and widest vector unit, e.g.
    "AMD EPYC (family 25 model 17, AVX2)": virtual machines often report a bare "AMD EPYC",
    and a masked AVX-512 changes eqicl's kernel speed severalfold."""
    import platform

    info: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if not key and info:
                    break  # the first processor's block is enough
                info.setdefault(key, value.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or "unknown"
    if "cpu family" not in info:
        return name
    flags = set(info.get("flags", "").split())
    simd = next(
        (
            label
            for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"))
            if flag in flags
        ),
        "SSE",
    )
    return f"{name} (family {info['cpu family']} model {info.get('model', '?')}, {simd})"


def machine_line(dtype: str = "float64") -> str:
    """'<CPU model>, <N> cores, <dtype>': the machine beside a command's recorded figures."""
    import os

    return f"{cpu_model()}, {os.cpu_count()} cores, {dtype}"
