import csv
import io
import json
import math

import jax
import jax.random as jr
import pytest

import eqicl
from analysis.table import compare, verdict
from eqicl._sweep import (
    Cell,
    SweepError,
    cell_config,
    neighbour_candidates,
    parse_cells,
    read_table,
    recipe_steps,
    start_candidates,
    start_losses,
    start_name,
    task_for,
    validation_loss,
    warm_start,
    weights_path,
)
from eqicl.sweep import main

SMALL = [
    "train.steps=20",
    "train.steps_per_call=10",
    "train.checkpoint_every=10",
    "train.batch=32",
    "train.select_sequences=64",
    "eval.sequences=400",
    "eval.tune_sequences=400",
    "eval.chunk=400",
    "eval.profile_points=3",
    "eval.profile_sequences=50",
]


def test_parse_cells():
    cells = parse_cells("diag,full", "1-2", "3,{1;3}")
    assert len(cells) == 8 and Cell("full", 2, "{1;3}") in cells
    assert len(parse_cells("all", "all", "all")) == 210
    for bad in (("mlp", "1", "3"), ("diag", "8", "3"), ("diag", "1", "9"), ("diag", "a-b", "3")):
        with pytest.raises(SweepError):
            parse_cells(*bad)


def test_cell_config_and_names():
    assert task_for("{1;3;5}").sigma_set == (1.0, 3.0, 5.0)
    config = cell_config(Cell("full", 4, "{1;3}"), steps=123, seeds=2)
    assert (config.model.kind, config.model.layers, config.train.steps, config.train.seeds) == (
        "full",
        4,
        123,
        2,
    )
    assert config.task.label == "{1;3}" and eqicl.paper_value(config) == 0.032
    # The recipe's steps: 1000 x (layers + 1), twice that for FULL from 5 layers.
    recipe = {
        (m, n): cell_config(Cell(m, n, "3"), steps=None, seeds=1).train.steps
        for m in ("gdpp", "diag", "full")
        for n in (1, 4, 5, 7)
    }
    assert (
        recipe[("gdpp", 1)] == 2000 and recipe[("gdpp", 5)] == 6000 and recipe[("gdpp", 7)] == 8000
    )
    assert recipe[("diag", 4)] == recipe[("full", 4)] == 5000
    assert recipe[("diag", 5)] == 6000 and recipe[("diag", 7)] == 8000
    assert recipe[("full", 5)] == 12000 and recipe[("full", 7)] == 16000
    with pytest.raises(SweepError, match="unknown model"):
        recipe_steps("mlp", 3)
    assert (
        Cell("gdpp", 7, "{1;3;5}").name == "gdpp-L7-c1_3_5"
        and Cell("diag", 1, "0").name == "diag-L1-u0"
    )


def test_verdicts():
    assert verdict(0.095, 0.001, 0.087) == "matched"  # within 10 %
    assert verdict(0.070, 0.001, 0.087) == "beaten"
    assert verdict(0.100, 0.001, 0.087) == "missed"
    assert verdict(1e-6, 1e-7, 2.5e-12) == "matched"  # σ_max = 0: within 0.002
    assert verdict(float("nan"), 0.0, 0.1) == "missed"


def test_duplicated_or_foreign_rows_are_refused(tmp_path):
    path = tmp_path / "table1.csv"
    header = "method,layers,noise,adjusted,adjusted_se,exact,exact_se,paper,steps,seeds,lr,best_seed,init,train_seconds,eval_seconds,status\n"
    row = "DIAG,3,3,0.08,0.001,0.08,0.001,0.087,10,1,0.03,0,gd,1,1,ok\n"
    path.write_text(header + row + row)
    with pytest.raises(SweepError, match="recorded twice"):
        read_table(path)
    path.write_text(header + row.replace("DIAG", "MLP"))
    with pytest.raises(SweepError, match="not a Table 1 cell"):
        read_table(path)
    path.write_text("method,layers\nDIAG,3\n")
    with pytest.raises(SweepError, match="lacks the column"):
        read_table(path)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Four small cells (GD++ and DIAG, 1 layer) swept end to end through the command line."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    args = ["--models", "gdpp,diag", "--layers", "1", "--noise", "0,{1;3}"]
    args += ["--run-root", str(tmp_path / "runs"), "--paper-dir", str(tmp_path / "paper")]
    args += ["--no-progress"]
    for s in SMALL:
        args += ["--set", s]
    assert main(args) == 0
    return tmp_path, args


def test_sweep_records_cells_and_skips_recorded_ones(swept, capsys):
    tmp_path, args = swept
    rows = read_table(tmp_path / "paper" / "table1.csv")
    assert set(rows) == {Cell(m, 1, c) for m in ("gdpp", "diag") for c in ("0", "{1;3}")}
    assert all(r["status"] == "ok" and float(r["exact_se"]) > 0 for r in rows.values())
    # the warm start: DIAG starts from the GD++ cell of its column, GD++ from the GD step
    assert rows[Cell("diag", 1, "{1;3}")]["init"] == "paper/gdpp-L1-c1_3"
    assert rows[Cell("gdpp", 1, "0")]["init"] == "gd"
    run_config = eqicl.read_run_config(tmp_path / "runs" / "diag-L1-c1_3")
    assert run_config.model.init_from.endswith("weights/gdpp-L1-c1_3.npz")
    for name in ("gdpp-L1-u0", "diag-L1-c1_3"):
        _, meta = eqicl.load_weights(tmp_path / "paper" / "weights" / f"{name}.npz")
        sel = json.loads((tmp_path / "paper" / "cells" / f"{name}.json").read_text())["selection"]
        assert meta["select_loss"] == sel["losses"][sel["best"]]
    cell = json.loads((tmp_path / "paper" / "cells" / "gdpp-L1-c1_3.json").read_text())
    assert len(cell["after_layer"]) == 1 and len(cell["profile"]["sigma"]) == 3
    base = list(csv.DictReader(io.StringIO((tmp_path / "paper" / "baselines.csv").read_text())))
    assert {(r["method"], r["noise"]) for r in base} >= {("tunedrr", "0"), ("constrr", "{1;3}")}
    capsys.readouterr()
    before = (tmp_path / "paper" / "table1.csv").read_text()
    assert main(args) == 0
    assert "4 already in" in capsys.readouterr().out
    assert (tmp_path / "paper" / "table1.csv").read_text() == before
    text, counts = compare(tmp_path / "paper")
    assert counts["missing"] == 206 and counts["matched"] + counts["beaten"] + counts["missed"] == 4
    assert "GD++ | 1 |" in text
    # --list shows what a recorded cell was trained with, and what the config is now
    assert main([*args, "--list", "--models", "gdpp", "--noise", "0"]) == 0
    assert capsys.readouterr().out.split() == [
        "gdpp-L1-u0",
        "recorded",
        "steps=20",
        "lr=0.03",
        "seeds=1",
        "start=gd",
    ]
    assert main([*args, "--list", "--models", "gdpp", "--noise", "0", "--seeds", "2"]) == 0
    assert capsys.readouterr().out.strip().endswith("start=gd (asked now: seeds=2)")
    # ... but the run directories hold runs of one seed: nothing runs, nothing is written
    files = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file())
    assert main([*args, "--force", "--seeds", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 4 run directories under") and "\n" not in err.strip()
    assert "(train.seeds: 1 in the directory, 2 asked)" in err and "nothing was run" in err
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()) == files
    # --force with the same config records the finished run's results again; nothing retrains
    metrics = (tmp_path / "runs" / "gdpp-L1-u0" / "metrics.jsonl").read_text()
    assert main([*args, "--force", "--models", "gdpp", "--noise", "0"]) == 0
    assert "1 to run" in capsys.readouterr().out
    assert (tmp_path / "runs" / "gdpp-L1-u0" / "metrics.jsonl").read_text() == metrics
    assert (tmp_path / "paper" / "table1.csv").read_text() == before


def test_bad_sweep_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["--layers", "0", "--paper-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: unknown layers '0'")
    assert (
        main(
            [
                "--set",
                "train.lrr=1",
                "--paper-dir",
                str(tmp_path),
                "--models",
                "diag",
                "--layers",
                "1",
                "--noise",
                "3",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown config key 'train.lrr'" in err and "\n" not in err.strip()
    assert not any(tmp_path.iterdir())
    paper = ["--paper-dir", str(tmp_path / "paper")]
    for args, message in [
        (["--cold", "--starts-from", str(tmp_path)], "takes no --starts-from"),
        (["--starts-from", str(tmp_path / "nowhere")], "no table1.csv there"),
        (["--max-layers", "0"], "--max-layers must be N >= 1 and M >= 0"),
        (["--max-layers", "4,full:-1"], "--max-layers must be N >= 1 and M >= 0"),
        (["--max-layers", "4,mlp:7"], "unknown model 'mlp'"),
        (["--max-layers", "four"], "must be N or N,MODEL:M"),
        (["--across-noise"], "takes its starts from --starts-from"),
    ]:
        assert main(args + paper) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "\n" not in err.strip()
    assert not any(tmp_path.iterdir())


def test_max_layers_keeps_the_shallow_cells(tmp_path, capsys):
    args = [
        "--list",
        "--cold",
        "--models",
        "diag,full",
        "--noise",
        "3",
        "--paper-dir",
        str(tmp_path),
    ]
    assert main(args + ["--max-layers", "4"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == [f"{m}-L{k}-u3" for k in (1, 2, 3, 4) for m in ("diag", "full")]
    assert main(args + ["--max-layers", "2,FULL:3"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["diag-L1-u3", "full-L1-u3", "diag-L2-u3", "full-L2-u3", "full-L3-u3"]
    assert main(args + ["--max-layers", "2,full:0"]) == 0  # the polish pass's "no FULL"
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["diag-L1-u3", "diag-L2-u3"]


def test_figures_redraw_from_committed_files(swept):
    from analysis.figures import draw_all

    tmp_path, _ = swept
    paths = draw_all(tmp_path / "paper")
    assert [p.name for p in paths] == [f"figure{i}.png" for i in (1, 2, 3, 5, 6, 7)]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_figure4_redraws_from_the_committed_weights(tmp_path, capsys):
    """Figure 4 needs no checkpoint: the sweep's weights file of the FULL 4-layer {1;3} cell."""
    from analysis.figures import main as figures_main

    paper = tmp_path / "paper"
    (paper / "table1.csv").parent.mkdir(parents=True)
    (paper / "table1.csv").write_text(",".join(eqicl._sweep.TABLE_FIELDS) + "\n")
    cell = Cell("full", 4, "{1;3}")
    config = cell_config(cell, None, 1)
    model = eqicl.init_transformer(jr.key(0), config.model, config.task)
    eqicl.save_weights(model, weights_path(paper, cell), select_loss=0.1)
    assert figures_main(["--paper-dir", str(paper)]) == 0
    assert "figure4.png (from" in capsys.readouterr().out
    assert (paper / "figures" / "figure4.png").read_bytes()[:4] == b"\x89PNG"
    weights_path(paper, cell).write_bytes(b"damaged")
    assert figures_main(["--paper-dir", str(paper)]) == 2
    assert "Figure 4" in capsys.readouterr().err


def test_reused_test_data_gives_the_same_evaluation():
    """Under reuse_test_data (the sweep), a second model scored on the cached sequences gets
    the numbers it gets on freshly drawn ones."""
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np

    import eqicl
    from eqicl._evaluate import evaluate, reuse_test_data

    config = eqicl.preset("tiny")
    models = [
        eqicl.init_transformer(jr.key(k), config.model, config.task, jnp.float64) for k in (0, 1)
    ]
    fresh = [evaluate(m, config, baselines=False) for m in models]
    with reuse_test_data():
        cached = [evaluate(m, config, baselines=False) for m in models]
    for a, b in zip(fresh, cached, strict=True):
        for key in ("adjusted_exact", "adjusted_sampled", "unadjusted"):
            np.testing.assert_allclose(a["model"][key]["mean"], b["model"][key]["mean"], rtol=1e-12)
        np.testing.assert_allclose(a["profile"]["model"], b["profile"]["model"], rtol=1e-11)


def _record_candidate(paper_dir, cand, loss):
    """A recorded cell as the sweep leaves it: weights file and cell file (its selection)."""
    config = cell_config(cand, None, 1)
    model = eqicl.init_transformer(jr.key(0), config.model, config.task)
    eqicl.save_weights(model, weights_path(paper_dir, cand), select_loss=loss)
    sel = {"losses": [9.0, loss], "best": 1}
    (paper_dir / "cells").mkdir(parents=True, exist_ok=True)
    (paper_dir / "cells" / f"{cand.name}.json").write_text(json.dumps({"selection": sel}))


def test_warm_start_picks_the_best_recorded_candidate(tmp_path):
    """Candidates embed exactly; the choice is the lowest validation loss (the cell file's
    selection) among the recorded ones; nothing recorded means the GD start."""
    cell = Cell("full", 3, "5")
    assert start_candidates(cell) == [
        Cell("full", 2, "5"),
        Cell("diag", 3, "5"),
        Cell("gdpp", 3, "5"),
    ]
    assert start_candidates(Cell("gdpp", 1, "0")) == []
    assert warm_start(tmp_path, cell) is None
    for cand, loss in [(Cell("full", 2, "5"), 0.3), (Cell("gdpp", 3, "5"), 0.2)]:
        _record_candidate(tmp_path, cand, loss)
    assert warm_start(tmp_path, cell) == weights_path(tmp_path, Cell("gdpp", 3, "5"))
    _record_candidate(tmp_path, Cell("diag", 3, "5"), 0.1)
    assert warm_start(tmp_path, cell) == weights_path(tmp_path, Cell("diag", 3, "5"))
    # a candidate that cannot start this cell's config (two heads asked for) is passed over
    two_heads = cell_config(cell, None, 1, ["model.heads=2"])
    assert warm_start(tmp_path, cell, two_heads) is None
    ok = cell_config(cell, None, 1)
    assert warm_start(tmp_path, cell, ok) == weights_path(tmp_path, Cell("diag", 3, "5"))
    weights_path(tmp_path, Cell("diag", 3, "5")).write_bytes(b"damaged")
    assert warm_start(tmp_path, cell) == weights_path(tmp_path, Cell("gdpp", 3, "5"))


def test_warm_start_also_looks_in_other_passes(tmp_path):
    """With `also` (the warm pass's --starts-from the cold pass), the candidates of both
    directories compete on validation loss; a tie goes to the pass's own directory."""
    own, cold = tmp_path / "warm", tmp_path / "cold"
    cell = Cell("diag", 4, "6")
    _record_candidate(own, Cell("diag", 3, "6"), 0.13)  # the own chain's bad basin
    _record_candidate(own, Cell("gdpp", 4, "6"), 0.20)
    assert warm_start(own, cell) == weights_path(own, Cell("diag", 3, "6"))
    assert warm_start(own, cell, also=[cold]) == weights_path(own, Cell("diag", 3, "6"))
    _record_candidate(cold, Cell("diag", 3, "6"), 0.07)
    start = warm_start(own, cell, cell_config(cell, None, 1), also=[cold])
    assert start == weights_path(cold, Cell("diag", 3, "6"))
    assert start_name(start) == "cold/diag-L3-u6"
    _record_candidate(own, Cell("diag", 3, "6"), 0.07)  # a tie: the own directory first
    assert warm_start(own, cell, also=[cold]) == weights_path(own, Cell("diag", 3, "6"))
    assert start_name(tmp_path / "elsewhere" / "my-model.npz") == "my-model"


def test_start_losses_are_the_recorded_validation_losses(swept):
    """Scoring recorded cells' weights as starts of the same cell reproduces the validation
    loss each run recorded (same held-out sequences, same function), whether scored alone or
    together; a file that cannot start the cell scores inf."""
    tmp_path, _ = swept
    paper = tmp_path / "paper"
    for cell in (Cell("diag", 1, "{1;3}"), Cell("gdpp", 1, "0")):
        config = cell_config(cell, None, 1, SMALL)
        (got,) = start_losses([weights_path(paper, cell)], config)
        assert got == pytest.approx(validation_loss(paper, cell), rel=1e-6)
    config = cell_config(Cell("diag", 1, "0"), None, 1, SMALL)
    paths = [weights_path(paper, Cell(m, 1, "0")) for m in ("gdpp", "diag")]
    together = start_losses([paths[0], tmp_path / "missing.npz", paths[1]], config)
    alone = [start_losses([p], config)[0] for p in paths]
    assert together[1] == math.inf
    assert [together[0], together[2]] == pytest.approx(alone, rel=1e-12)
    # in float32 the selection sequences would be other ones: refused, not silently compared
    with jax.enable_x64(False), pytest.raises(SweepError, match="jax_enable_x64"):
        start_losses(paths, config)


def test_warm_start_across_noise_settings(swept, tmp_path):
    """With across_noise the same model and depth of a neighbouring noise setting, recorded
    in another pass, competes on this cell's validation sequences (its own units)."""
    cold = swept[0] / "paper"  # holds GD++ and DIAG 1-layer cells for sigma_max = 0
    own = tmp_path / "warm"
    cell = Cell("diag", 1, "1")
    assert neighbour_candidates(cell) == [Cell("diag", 1, "0"), Cell("diag", 1, "2")]
    assert neighbour_candidates(Cell("full", 3, "{1;3}")) == [
        Cell("full", 3, "3"),
        Cell("full", 3, "{1;3;5}"),
    ]
    config = cell_config(cell, None, 1, SMALL)
    assert warm_start(own, cell, config, also=[cold]) is None
    neighbour = weights_path(cold, Cell("diag", 1, "0"))
    assert warm_start(own, cell, config, also=[cold], across_noise=True) == neighbour
    (loss,) = start_losses([neighbour], config)
    assert math.isfinite(loss) and loss != validation_loss(cold, Cell("diag", 1, "0"))
    _record_candidate(own, Cell("gdpp", 1, "1"), loss * 1.01)
    assert warm_start(own, cell, config, also=[cold], across_noise=True) == neighbour
    _record_candidate(own, Cell("gdpp", 1, "1"), loss * 0.99)
    mine = weights_path(own, Cell("gdpp", 1, "1"))
    assert warm_start(own, cell, config, also=[cold], across_noise=True) == mine


def test_an_interrupted_cell_resumes_with_the_start_it_had(tmp_path):
    """A cell whose run directory exists keeps its recorded start, even if a better one has
    been recorded since (otherwise its config would differ and the run be refused)."""
    from eqicl._run import prepare_run_dir
    from eqicl._sweep import _resumed_config

    cell = Cell("diag", 2, "3")
    started = cell_config(cell, None, 1, SMALL, "runs/paper/weights/diag-L1-u3.npz")
    prepare_run_dir(tmp_path / cell.name, started)
    assert _resumed_config(tmp_path / cell.name, cell, None, 1, SMALL) == started
    assert _resumed_config(tmp_path / cell.name, cell, None, 2, SMALL) is None  # other recipe
    assert _resumed_config(tmp_path / "nothing", cell, None, 1, SMALL) is None


def test_merge_keeps_the_pass_with_the_lower_validation_loss(tmp_path, capsys):
    """Cell by cell, the lower validation loss wins (never the test loss); its row, cell file
    and weights are copied and the row names the pass; a pass missing a cell does not count."""
    from eqicl._sweep import TABLE_FIELDS, _write_csv

    cells = [Cell("diag", 2, "3"), Cell("full", 2, "3")]
    # (validation, test) per pass: cold wins DIAG on validation although its test loss is worse
    losses = {"cold": {cells[0]: (0.1, 0.9), cells[1]: (0.5, 0.1)}, "warm": {cells[0]: (0.2, 0.05)}}
    losses["warm"][cells[1]] = (0.3, 0.2)
    for name, by_cell in losses.items():
        d = tmp_path / name
        rows = []
        for cell, (val, test) in by_cell.items():
            row = dict.fromkeys(TABLE_FIELDS, "1")
            row.update(method=cell.row, layers=cell.layers, noise=cell.column, exact=test)
            rows.append(row)
            (d / "cells").mkdir(parents=True, exist_ok=True)
            sel = {"losses": [9.0, val], "best": 1}
            (d / "cells" / f"{cell.name}.json").write_text(json.dumps({"selection": sel}))
            config = cell_config(cell, None, 1)
            model = eqicl.init_transformer(jr.key(0), config.model, config.task)
            eqicl.save_weights(model, weights_path(d, cell), select_loss=val, tag=name)
        _write_csv(d / "table1.csv", TABLE_FIELDS, rows)
    out = tmp_path / "paper"
    args = ["--merge", f"{tmp_path / 'cold'},{tmp_path / 'warm'}", "--paper-dir", str(out)]
    assert main([*args, "--list"]) == 0  # what it would take, writing nothing
    assert capsys.readouterr().out.splitlines() == [
        "diag-L2-u3       from cold     validation cold=0.1 warm=0.2",
        "full-L2-u3       from warm     validation cold=0.5 warm=0.3",
    ]
    assert not out.exists()
    part = tmp_path / "part"  # a pass with only the DIAG row, and no cell file for it
    part.mkdir()
    _write_csv(
        part / "table1.csv", TABLE_FIELDS, [read_table(tmp_path / "cold" / "table1.csv")[cells[0]]]
    )
    assert main(["--merge", f"{tmp_path / 'cold'},{part}", "--paper-dir", str(out), "--list"]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == [
        "diag-L2-u3       from cold     validation cold=0.1 part=inf",
        "full-L2-u3       from cold     validation cold=0.5 part=-",
    ]
    assert main(args) == 0
    assert "1 cells from cold, 1 cells from warm" in capsys.readouterr().out
    merged = read_table(out / "table1.csv")
    assert merged[cells[0]]["pass"] == "cold" and float(merged[cells[0]]["exact"]) == 0.9
    assert merged[cells[1]]["pass"] == "warm" and float(merged[cells[1]]["exact"]) == 0.2
    assert eqicl.load_weights(weights_path(out, cells[0]))[1]["tag"] == "cold"
    data = json.loads((out / "cells" / f"{cells[1].name}.json").read_text())
    assert data["pass"] == "warm" and data["validation_by_pass"] == {"cold": 0.5, "warm": 0.3}
    text, counts = compare(out)
    from analysis.table import claims

    no_base = "\n".join(claims(out))
    assert "beat AdaRR at σ_max ≥ 4: no baselines in" in no_base
    assert "(cold)" in text and "1 from cold, 1 from warm" in text
    assert (
        "By model: DIAG 0 matched, 0 beaten, 1 missed; FULL 1 matched, 0 beaten, 0 missed" in text
    )
    assert main(["--merge", str(tmp_path / "nothing"), "--paper-dir", str(out)]) == 2


def test_checking_a_warm_started_run_never_reads_its_start(tmp_path):
    """A warm start has the structure of a GD start: the state skeleton (used to check and
    restore checkpoints) is the same, and needs no weights file."""
    from eqicl._run import skeleton

    cell = Cell("full", 2, "3")
    cold = cell_config(cell, None, 2, SMALL)
    warm = cell_config(cell, None, 2, SMALL, str(tmp_path / "gone.npz"))
    assert jax.tree.structure(skeleton(warm)) == jax.tree.structure(skeleton(cold))
    src = cell_config(Cell("diag", 2, "3"), None, 1, SMALL)
    eqicl.save_weights(eqicl.init_transformer(jr.key(0), src.model, src.task), tmp_path / "d.npz")
    warm = cell_config(cell, None, 2, SMALL, str(tmp_path / "d.npz"))
    state = eqicl.init_ensemble(warm)
    assert jax.tree.structure(state) == jax.tree.structure(skeleton(cold))


def test_polish_pass_records_the_best_start_by_validation_loss(swept, tmp_path, capsys):
    """The polish pass scores the recorded weights, their polished starts (GD++, DIAG) and the
    polished narrower cells (embedded) on the cell's validation sequences, records the best
    like a trained cell, skips recorded cells, and its results merge with the passes they
    came from. A FULL cell is not polished itself: it gets the narrower cells' results."""
    import shutil

    from eqicl._sweep import TABLE_FIELDS, _write_csv

    source, out = tmp_path / "paper", tmp_path / "polish"
    shutil.copytree(swept[0] / "paper", source)
    args = ["--polish", str(source), "--layers", "1", "--noise", "0", "--steps", "5"]
    args += ["--paper-dir", str(out), "--no-progress"]
    for s in SMALL:
        args += ["--set", s]
    assert main(args + ["--models", "gdpp,diag"]) == 0
    assert "2 to polish" in capsys.readouterr().out
    rows = read_table(out / "table1.csv")
    assert set(rows) == {Cell("gdpp", 1, "0"), Cell("diag", 1, "0")}
    polished = [f"polished start {k}" for k in range(4)]
    for cell, row in rows.items():
        assert row["status"] == "ok" and row["init"] == f"paper/{cell.name}"
        sel = json.loads((out / "cells" / f"{cell.name}.json").read_text())["selection"]
        narrower = ["polish/gdpp-L1-u0"] if cell.model == "diag" else []
        assert sel["candidates"] == [f"paper/{cell.name}", *polished, *narrower]
        assert len(sel["losses"]) == len(sel["candidates"])
        # candidate 0 is the recorded model itself: its validation loss is the recorded one
        assert sel["losses"][0] == pytest.approx(validation_loss(source, cell), rel=1e-9)
        assert sel["losses"][sel["best"]] == min(sel["losses"])
        _, meta = eqicl.load_weights(weights_path(out, cell))
        assert meta["select_loss"] == sel["losses"][sel["best"]]
    assert main(args + ["--models", "gdpp,diag"]) == 0
    assert "2 already polished" in capsys.readouterr().out
    assert main(args + ["--list", "--models", "gdpp,full"]) == 0  # lists, runs nothing
    listed = capsys.readouterr().out.split()
    assert listed[:5] == ["gdpp-L1-u0", "polished", "full-L1-u0", "not", "in"]

    # a FULL cell recorded in the source (here its GD start): only embedded candidates
    full = Cell("full", 1, "0")
    config = cell_config(full, None, 1, SMALL)
    model = eqicl.init_transformer(jr.key(0), config.model, config.task)
    eqicl.save_weights(model, weights_path(source, full), select_loss=1.0)
    table = read_table(source / "table1.csv")
    table[full] = {**table[Cell("diag", 1, "0")], "method": "FULL"}
    _write_csv(source / "table1.csv", TABLE_FIELDS, table.values())
    assert main(args + ["--models", "full"]) == 0
    sel = json.loads((out / "cells" / "full-L1-u0.json").read_text())["selection"]
    assert sel["candidates"] == ["paper/full-L1-u0", "polish/gdpp-L1-u0", "polish/diag-L1-u0"]
    # the narrower cells keep their validation losses as FULL models (the same functions)
    by_name = dict(zip(sel["candidates"], sel["losses"], strict=True))
    for name in ("gdpp-L1-u0", "diag-L1-u0"):
        _, meta = eqicl.load_weights(out / "weights" / f"{name}.npz")
        assert by_name[f"polish/{name}"] == pytest.approx(meta["select_loss"], rel=1e-9)
    assert sel["best"] > 0  # the GD step is not the best one-layer model

    merged = tmp_path / "merged"
    assert main(["--merge", f"{source},{out}", "--paper-dir", str(merged)]) == 0
    assert len(read_table(merged / "table1.csv")) == 5
    assert main(["--polish", str(tmp_path / "none"), "--paper-dir", str(out)]) == 2
    assert "no table1.csv there" in capsys.readouterr().err
    assert main(["--polish", str(source), "--cold", "--paper-dir", str(out)]) == 2
