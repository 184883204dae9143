"""The run directory: config.json, metrics.jsonl, checkpoints/ (orbax), eval.json.

A run directory is the contract between training and everything that reads its results
(STYLE §7). Training resumes by default from the newest complete checkpoint.
"""

import json
import logging
import os
import pathlib
import time
from collections.abc import Callable

import equinox as eqx
import jax
import numpy as np

from ._config import Config, ConfigError
from ._evaluate import _member, evaluate, select_losses
from ._train import TrainState, append_jsonl, init_ensemble, train_loop

FORMAT = 1
__version__ = "0.1.0"


class RunDirError(ValueError):
    """A run directory that cannot be used as asked. The message is one line."""


def _ocp():
    # orbax is slow to import and chatty (it warns about every read-only manager); only load
    # it where checkpoints are touched.
    logging.getLogger("absl").setLevel(logging.ERROR)
    import orbax.checkpoint as ocp

    return ocp


def write_json_atomic(path: pathlib.Path, data) -> None:
    """Write JSON so that readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_run_config(run_dir: str | os.PathLike) -> Config:
    """The config of an existing run directory (raises RunDirError if it is not one)."""
    path = pathlib.Path(run_dir) / "config.json"
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not an eqicl run directory (no config.json)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "config" not in data:
        raise RunDirError(
            f"{path} was written by an unknown eqicl version (format {data.get('format') if isinstance(data, dict) else '?'}, expected {FORMAT})"
        )
    try:
        return Config.from_dict(data["config"])
    except ConfigError as e:
        raise RunDirError(f"{path}: {e}") from None


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} in the directory, {vb!r} asked")
    return out


def prepare_run_dir(run_dir: str | os.PathLike, config: Config) -> pathlib.Path:
    """Create the run directory and write config.json before step 0, or check that an
    existing one holds the same config (then the run resumes)."""
    path = pathlib.Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} exists and is not a directory")
    if (path / "config.json").exists():
        existing = read_run_config(path)
        diffs = _diff(existing.to_dict(), config.to_dict())
        if diffs:
            raise RunDirError(
                f"{path} holds a run with a different config ({diffs[0]}"
                f"{f' and {len(diffs) - 1} more' if len(diffs) > 1 else ''}); "
                "choose another --run-dir or delete that directory"
            )
        return path
    if path.exists() and any(path.iterdir()):
        raise RunDirError(
            f"{path} is not empty and is not an eqicl run directory; refusing to write there"
        )
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        path / "config.json", {"format": FORMAT, "eqicl": __version__, "config": config.to_dict()}
    )
    return path


def skeleton(config: Config) -> TrainState:
    """The shapes and dtypes of a run's training state, without computing it."""
    return eqx.filter_eval_shape(init_ensemble, config)


def checkpoint_manager(run_dir: pathlib.Path, read_only: bool = False):
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=2, create=not read_only, enable_async_checkpointing=False, read_only=read_only
    )
    return ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=options)


def save_checkpoint(manager, state: TrainState) -> None:
    ocp = _ocp()
    leaves = jax.tree.leaves(eqx.filter(state, eqx.is_array))
    step = int(state.step[0])
    manager.save(step, args=ocp.args.StandardSave(_as_dict(leaves)), force=True)
    manager.wait_until_finished()


def restore_checkpoint(manager, config: Config, step: int | None = None) -> TrainState | None:
    """The newest (or the given) checkpoint, restored into the config's state structure."""
    ocp = _ocp()
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    shapes = skeleton(config)
    dynamic, static = eqx.partition(shapes, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    abstract = jax.tree.leaves(dynamic)
    restored = manager.restore(step, args=ocp.args.StandardRestore(_as_dict(abstract)))
    leaves = [restored[k] for k in sorted(restored)]
    treedef = jax.tree.structure(dynamic)
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


def _as_dict(leaves: list) -> dict:
    # The state's leaves in order, under zero-padded keys: orbax stores dicts by key, and the
    # structure itself is rebuilt from the config (static fields are never saved).
    return {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}


def load_model(run_dir: str | os.PathLike, member: int | None = None):
    """The trained model of a run: the selected best member (from eval.json) unless `member`
    is given. Returns (model, config)."""
    path = pathlib.Path(run_dir)
    config = read_run_config(path)
    if member is None:
        ev = path / "eval.json"
        member = json.loads(ev.read_text())["selection"]["best"] if ev.is_file() else 0
    manager = checkpoint_manager(path, read_only=True)
    state = restore_checkpoint(manager, config)
    if state is None:
        raise RunDirError(f"{path} has no checkpoint yet")
    return _member(state.model, member), config


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Drop metric lines written after the checkpoint a run resumes from."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a torn last line from a crash
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def run(
    config: Config,
    run_dir: str | os.PathLike,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    baselines: bool = True,
) -> dict:
    """Train (or resume) into `run_dir`, select the best seed, evaluate, write eval.json
    (with the baselines on the same sequences unless `baselines=False`)."""
    path = prepare_run_dir(run_dir, config)
    manager = checkpoint_manager(path)
    metrics_path = path / "metrics.jsonl"
    state = restore_checkpoint(manager, config)
    if state is None:
        state = init_ensemble(config)
        start = 0
        if metrics_path.exists():
            metrics_path.unlink()
    else:
        start = int(state.step[0])
        _truncate_metrics(metrics_path, start)
        echo(f"resuming {path} from step {start}")
    tc = config.train
    eval_path = path / "eval.json"
    if start >= tc.steps and eval_path.is_file():
        echo(f"{path} is finished; results in {eval_path}")
        return json.loads(eval_path.read_text())

    if start < tc.steps:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

        def on_chunk(state, metrics):
            append_jsonl(metrics_path, metrics)
            step = metrics["step"]
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                save_checkpoint(manager, state)
            if bar is not None:
                bar.update(step - bar.n)
                bar.set_postfix(loss=f"{min(metrics['loss']):.4g}", refresh=False)

        try:
            state = train_loop(config, state, on_chunk)
        finally:
            if bar is not None:
                bar.close()

    losses = np.asarray(select_losses(state.model, config), np.float64)
    finite = np.isfinite(losses)
    seconds = _train_seconds(metrics_path)
    selection = {
        "losses": [float(v) for v in losses],
        "best": int(np.argmin(np.where(finite, losses, np.inf))),
    }
    if not finite.any():
        result = {
            "status": "failed",
            "reason": "every seed's model gives non-finite predictions",
            "selection": selection,
            "train_seconds": seconds,
        }
        write_json_atomic(eval_path, result)
        return result
    echo(
        f"evaluating seed {selection['best']} of {len(losses)} on {config.eval.sequences:,} sequences"
    )
    t0 = time.perf_counter()
    result = evaluate(_member(state.model, selection["best"]), config, baselines=baselines)
    result.update(
        status="ok" if result["model"]["finite"] else "failed",
        selection=selection,
        train_seconds=seconds,
        eval_seconds=time.perf_counter() - t0,
        steps=tc.steps,
    )
    write_json_atomic(eval_path, result)
    return result


def _train_seconds(metrics_path: pathlib.Path) -> float:
    if not metrics_path.exists():
        return 0.0
    return float(
        sum(json.loads(line)["seconds"] for line in metrics_path.read_text().splitlines() if line)
    )


def summary_table(config: Config, result: dict) -> str:
    """A short table: this model, the baselines, the paper's values."""
    if result.get("status") == "failed":
        return f"FAILED: {result.get('reason', 'non-finite predictions')}"
    paper = result.get("paper", {})
    m = config.model
    name = f"{m.kind.upper() if m.kind != 'gdpp' else 'GD++'} L={m.layers}"
    lines = [
        f"adjusted loss, task {config.task.noise} σ {config.task.label}, d={config.task.d} n={config.task.n}, "
        f"{result['sequences']:,} test sequences",
        f"{'method':<14}{'exact':>18}{'sampled':>18}{'paper':>9}",
    ]

    def row(label, r, ref):
        ex, sa = r["adjusted_exact"], r["adjusted_sampled"]
        ref_s = f"{ref:.3g}" if ref is not None else "-"
        return f"{label:<14}{ex['mean']:>10.4g} ± {ex['se']:<5.1g}{sa['mean']:>10.4g} ± {sa['se']:<5.1g}{ref_s:>9}"

    lines.append(row(name, result["model"], paper.get("model")))
    for b in ("constrr", "adarr", "tunedrr", "ols", f"gd{m.layers}"):
        if b in result["baselines"]:
            label = {
                "constrr": "ConstRR",
                "adarr": "AdaRR",
                "tunedrr": "TunedRR",
                "ols": "OLS",
            }.get(b, f"GD {m.layers} steps")
            lines.append(row(label, result["baselines"][b], paper.get(b)))
    lines.append(
        f"train {result.get('train_seconds', 0):.1f} s, eval {result.get('eval_seconds', 0):.1f} s"
    )
    return "\n".join(lines)
