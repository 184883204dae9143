"""Analysis of a run directory: reads only config.json, eval.json and the checkpoints
(STYLE §7), writes `analysis/extract.json` and the figures beside them."""

import json
import os
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import jax.random as jr

import eqicl

from ._extract import analyse, default_sigmas, per_sigma
from ._figures import write_figures

FORMAT = 1


def load_finished(run_dir: str | os.PathLike) -> tuple[eqicl.LinearTransformer, eqicl.Config, dict]:
    """(model, config, eval.json) of a finished run: exactly the model eval.json describes
    (its selected seed, from the checkpoint of its step, recorded as ev["checkpoint"]).
    Raises `eqicl.RunDirError` (one-line message) for anything else, a damaged or missing
    checkpoint of that step included: an older one is never analysed in its place."""
    path = pathlib.Path(run_dir)
    if not path.is_dir():
        raise eqicl.RunDirError(f"{path} does not exist or is not a directory")
    config = eqicl.read_run_config(path)  # checks the format version
    ev_path = path / "eval.json"
    hint = f"finish it first with `python -m eqicl.train --run-dir {path} ...` (same config)"
    if not ev_path.is_file():
        raise eqicl.RunDirError(f"{path} is unfinished (no eval.json); {hint}")
    try:
        ev = json.loads(ev_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise eqicl.RunDirError(f"{ev_path} is not a valid eval.json; {hint}") from None
    if not isinstance(ev, dict):
        raise eqicl.RunDirError(f"{ev_path} is not a valid eval.json; {hint}")
    if ev.get("status") != "ok":
        reason = ev.get("reason", "non-finite predictions")
        what = "a failed" if ev.get("status") == "failed" else f"a {ev.get('status')!s}"
        raise eqicl.RunDirError(f"{path} is {what} run ({reason}); there is no model to analyse")
    try:
        int(ev["selection"]["best"])
    except (KeyError, TypeError, ValueError):
        raise eqicl.RunDirError(f"{ev_path} is not a valid eval.json; {hint}") from None
    # Exactly the model eval.json describes: its seed at its step, never an older checkpoint.
    step = eqicl.evaluated_step(ev, config)
    try:
        model, _ = eqicl.load_model(path)  # refuses a damaged or missing checkpoint `step`
    except eqicl.RunDirError:
        raise
    except Exception as e:  # orbax raises many kinds for a damaged checkpoint directory
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise eqicl.RunDirError(
            f"{path}: cannot restore the checkpoint (written by another eqicl version? "
            f"{type(e).__name__}: {first[:200]})"
        ) from None
    ev = {**ev, "checkpoint": step}
    return model, config, ev


def analyse_run(
    run_dir: str | os.PathLike,
    sequences: int = 2000,
    sigmas: Sequence[float] | None = None,
    seed: int = 0,
    figures: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Analyse a finished run: `analyse` on `sequences` fresh sequences of its task and
    `per_sigma` at `sigmas` (default: 7 values from 0 to 1.5 × the largest training σ), in
    float64. Writes RUN_DIR/analysis/extract.json and PNG figures; returns what it wrote.
    Needs `jax_enable_x64` (the reconstruction error is meant to be at float64 round-off)."""
    if sequences < 2:
        raise ValueError(f"--sequences must be >= 2, got {sequences}")
    if sigmas is not None and any(not (0 <= s < float("inf")) for s in sigmas):
        raise ValueError(f"--sigma values must be finite and >= 0, got {list(sigmas)}")
    if not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "analysis runs in float64: call jax.config.update('jax_enable_x64', True) first"
        )
    path = pathlib.Path(run_dir)
    model, config, ev = load_finished(path)
    need = _memory(config, sequences, len(sigmas) if sigmas is not None else 7)
    if need > (have := eqicl.machine_memory()):
        raise eqicl.ConfigError(
            f"--sequences {sequences:,} needs about {need / 2**30:.3g} GiB of memory, "
            f"more than this machine's {have / 2**30:.3g} GiB"
        )
    out = path / "analysis"
    try:  # before the work, not after it: a read-only run directory is refused at once
        out.mkdir(exist_ok=True)
        probe = out / f".write-test{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise eqicl.RunDirError(f"cannot write in {out}: {e.strerror}") from None
    model = eqicl.cast(model, jnp.float64)
    sigmas = default_sigmas(config.task) if sigmas is None else [float(s) for s in sigmas]
    batch_key, sigma_key = jr.split(jr.key(seed))
    echo(
        f"analysing {path} (seed {ev['selection']['best']} at step {ev['checkpoint']}, "
        f"{config.model.kind} "
        f"{config.model.layers} layers) on {sequences:,} sequences"
    )
    batch = eqicl.sample_batch(batch_key, config.task, sequences, jnp.float64)
    result = analyse(model, batch)
    result["per_sigma"] = per_sigma(model, config.task, sigma_key, sigmas, sequences)
    result.update(
        format=FORMAT,
        eqicl=eqicl.__version__,
        run_dir=str(path),
        member=ev["selection"]["best"],
        checkpoint=ev["checkpoint"],
        seed=seed,
        task=config.to_dict()["task"],
    )
    if figures:
        result["figures"] = write_figures({**result, "metrics": _metrics(path)}, out)
    tmp = out / f".extract.json.tmp{os.getpid()}"
    try:
        tmp.write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
        os.replace(tmp, out / "extract.json")
    except BaseException:  # a full disk: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise
    return result


def _metrics(path: pathlib.Path) -> list[dict]:
    """The readable records of a run's metrics.jsonl (for the training curve; a damaged
    line is skipped, none if the file is missing)."""
    out = []
    try:
        lines = (path / "metrics.jsonl").read_bytes().decode("utf-8", "replace").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def _memory(config: eqicl.Config, sequences: int, sigmas: int) -> int:
    """Rough bytes of the largest arrays of the analysis (float64): the batch, every layer's
    tokens and Theorem 4.1 terms (a few D x D matrices per layer and sequence)."""
    d, n, layers = config.task.d, config.task.n, config.model.layers
    per_sequence = (n + 1) * (d + 1) * (layers + 1) + 8 * (d + 1) ** 2 * layers
    return sequences * per_sequence * 8 * max(2, sigmas // 2)


def summary(result: dict) -> str:
    """A few lines for the terminal: reconstruction error, coefficients, loss after k layers."""
    rec = result["reconstruction"]
    lines = [
        f"Theorem 4.1 reconstruction: max |token error| = {rec['max_abs']:.2e} "
        f"(relative {rec['max_rel']:.2e}, {rec['dtype']})",
    ]
    if "momentum" in result:
        mo = result["momentum"]
        lines.append(f"Lemma 4.4 identity: max |error| = {mo['identity_max_abs']:.2e}")
    src = "" if result["kind"] != "full" else " (block statistics of P, Q)"
    lines.append(
        f"{'layer':<7}{'w_xx':>11}{'w_xy':>11}{'w_yx':>11}{'w_yy':>11}{'loss':>11}{'best λ':>9}{src}"
    )
    w = result["weights"]
    for j, c in enumerate(result["coefficients"]["values"]):
        lines.append(
            f"{j + 1:<7}"
            + "".join(f"{v:>11.3g}" for v in c)
            + f"{w['oracle'][j + 1]['mean']:>11.4g}{w['best_lambda'][j + 1]:>9.3g}"
        )
    lines.append(
        f"(best single ridge λ on these sequences: loss {w['best_constant_loss']:.4g} "
        f"at λ = {w['best_constant_lambda']:.3g})"
    )
    for name, p in result.get("figures", {}).items():
        lines.append(f"figure {name}: {p}")
    return "\n".join(lines)
