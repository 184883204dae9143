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
    Polish,
    Recipe,
    SweepError,
    Train,
    assemble,
    cell_config,
    listing,
    neighbour_candidates,
    parse_cells,
    read_table,
    recipe_steps,
    stage_dir,
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


def test_a_sequence_cache_gives_the_same_evaluation():
    """Scored through one eqicl.SequenceCache (as the sweep scores a noise setting's cells),
    a second model gets the numbers it gets on freshly drawn sequences; the cache holds one
    setting at a time and draws again for another."""
    import dataclasses

    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np

    import eqicl

    config = eqicl.preset("tiny")
    models = [
        eqicl.init_transformer(jr.key(k), config.model, config.task, jnp.float64) for k in (0, 1)
    ]
    fresh = [eqicl.evaluate(m, config, baselines=False) for m in models]
    cache = eqicl.SequenceCache()
    cached = [eqicl.evaluate(m, config, baselines=False, test_cache=cache) for m in models]
    for a, b in zip(fresh, cached, strict=True):
        for key in ("adjusted_exact", "adjusted_sampled", "unadjusted"):
            np.testing.assert_allclose(a["model"][key]["mean"], b["model"][key]["mean"], rtol=1e-12)
        np.testing.assert_allclose(a["profile"]["model"], b["profile"]["model"], rtol=1e-11)
    noisier = dataclasses.replace(
        config, task=dataclasses.replace(config.task, sigma_max=config.task.sigma_max + 1)
    )
    want = eqicl.evaluate(models[0], noisier, baselines=False)
    got = eqicl.evaluate(models[0], noisier, baselines=False, test_cache=cache)
    assert got["model"]["adjusted_exact"]["mean"] != fresh[0]["model"]["adjusted_exact"]["mean"]
    np.testing.assert_allclose(
        got["model"]["adjusted_exact"]["mean"], want["model"]["adjusted_exact"]["mean"], rtol=1e-12
    )


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


def test_checking_a_warm_started_run_never_reads_its_start(tmp_path):
    """A warm start has the structure of a GD start: the state skeleton (used to check and
    restore checkpoints) is the same, and needs no weights file."""
    from eqicl._checkpoint import skeleton

    cell = Cell("full", 2, "3")
    cold = cell_config(cell, None, 2, SMALL)
    warm = cell_config(cell, None, 2, SMALL, str(tmp_path / "gone.npz"))
    assert jax.tree.structure(skeleton(warm)) == jax.tree.structure(skeleton(cold))
    src = cell_config(Cell("diag", 2, "3"), None, 1, SMALL)
    eqicl.save_weights(eqicl.init_transformer(jr.key(0), src.model, src.task), tmp_path / "d.npz")
    warm = cell_config(cell, None, 2, SMALL, str(tmp_path / "d.npz"))
    state = eqicl.init_ensemble(warm)
    assert jax.tree.structure(state) == jax.tree.structure(skeleton(cold))


# ---------------------------------------------------------------------------------------------
# The one driver over the candidate store.

# The recipe's stages at test size: the same kinds of stage, one layer, a small polish.
SMALL_RECIPE = Recipe(
    (
        Train("cold", max_layers="1"),
        Train("warm", warm=True, starts_from=("cold",)),
        Polish("polish", max_layers="1", starts=2, iterations=3, sequences=300),
    )
)
# ... with the warm stage's starts across noise settings, as in the recipe.
NOISY_RECIPE = Recipe(
    (
        Train("cold", max_layers="1"),
        Train("warm", warm=True, starts_from=("cold",), across_noise=True),
        Polish("polish", max_layers="1", starts=2, iterations=3, sequences=300),
    )
)
CELLS = ["--models", "gdpp,diag", "--layers", "1", "--noise", "0,{1;3}"]


def _args(tmp_path):
    args = ["--run-root", str(tmp_path / "runs"), "--paper-dir", str(tmp_path / "paper")]
    args += ["--no-progress", "--test-sequences", "600"]
    for s in SMALL:
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Four small cells (GD++ and DIAG, 1 layer) through every stage of the small recipe, by
    the command line (the recipe is the module's RECIPE)."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eqicl._sweep, "RECIPE", SMALL_RECIPE)
        assert main([*CELLS, *_args(tmp_path)]) == 0
    return tmp_path, [*CELLS, *_args(tmp_path)]


@pytest.fixture
def noisy_recipe(monkeypatch):
    monkeypatch.setattr(eqicl._sweep, "RECIPE", NOISY_RECIPE)


def test_cell_config_is_the_default_preset_with_the_cell(tmp_path):
    """The typed cell config equals the default preset with the cell's settings given as
    overrides, for every kind of column, with and without a start and `--set`."""
    for cell in (Cell("gdpp", 1, "0"), Cell("full", 6, "{1;3;5}"), Cell("diag", 3, "7")):
        task = task_for(cell.column)
        noise = (
            ["task.noise=categorical", "task.sigma_set=" + ",".join(map(str, task.sigma_set))]
            if task.noise == "categorical"
            else ["task.noise=uniform", f"task.sigma_max={task.sigma_max}"]
        )
        for extra, start in (([], ""), (["train.batch=64"], "w/x.npz")):
            want = eqicl.preset(
                "default",
                [
                    f"model.kind={cell.model}",
                    f"model.layers={cell.layers}",
                    f"train.lr={eqicl._sweep.LEARNING_RATES[cell.model]}",
                    "train.seeds=2",
                    *noise,
                    f"train.steps={recipe_steps(cell.model, cell.layers)}",
                    *([f"model.init_from={start}"] if start else []),
                    *extra,
                ],
            )
            assert cell_config(cell, None, 2, extra, start) == want


def test_one_command_runs_every_stage_and_the_table(swept, capsys):
    tmp_path, args = swept
    paper = tmp_path / "paper"
    cells = {Cell(m, 1, c) for m in ("gdpp", "diag") for c in ("0", "{1;3}")}
    for stage in SMALL_RECIPE.stages:  # one candidate per (cell, stage)
        rows = read_table(stage_dir(paper, stage) / "table1.csv")
        assert set(rows) == cells and all(r["status"] == "ok" for r in rows.values())
    rows = read_table(paper / "table1.csv")
    assert set(rows) == cells
    for cell, row in rows.items():  # the table: each cell's best candidate by validation loss
        losses = {
            st.name: validation_loss(stage_dir(paper, st), cell) for st in SMALL_RECIPE.stages
        }
        assert row["pass"] == min(losses, key=losses.get)
        assert validation_loss(paper, cell) == min(losses.values())
        assert float(row["tail_se"]) > 0 and int(row["tail_sequences"]) > 0
        assert 0 < float(row["exact_top"]) < 1 and float(row["exact_max"]) > 0
        # scored on the test seed: its own draw, as analysis.reeval scores the weights
        assert (row["test_seed"], row["test_sequences"]) == ("2027", "600")
        assert float(row["test_se"]) > 0 and float(row["test_tail_se"]) > 0
        assert row["test_weights"] == eqicl._score.weights_digest(weights_path(paper, cell))
    warm = read_table(stage_dir(paper, SMALL_RECIPE.stage("warm")) / "table1.csv")
    cold = read_table(stage_dir(paper, SMALL_RECIPE.stage("cold")) / "table1.csv")
    assert {r["init"] for r in cold.values()} == {"gd"}
    # warm DIAG starts from a GD++ candidate of its column (or a neighbour's cold one)
    assert warm[Cell("diag", 1, "{1;3}")]["init"] != "gd"
    polish = json.loads(
        (stage_dir(paper, SMALL_RECIPE.stage("polish")) / "cells" / "diag-L1-u0.json").read_text()
    )["selection"]
    assert polish["candidates"][1:] == ["polished start 0", "polished start 1", "polish/gdpp-L1-u0"]
    assert polish["candidates"][0] in ("cold/diag-L1-u0", "warm/diag-L1-u0")
    for name in ("gdpp-L1-u0", "diag-L1-c1_3"):
        _, meta = eqicl.load_weights(paper / "weights" / f"{name}.npz")
        sel = json.loads((paper / "cells" / f"{name}.json").read_text())["selection"]
        assert meta["select_loss"] == sel["losses"][sel["best"]]
    base = list(csv.DictReader(io.StringIO((paper / "baselines.csv").read_text())))
    assert {(r["method"], r["noise"]) for r in base} >= {("tunedrr", "0"), ("constrr", "{1;3}")}
    # run again: every stage has everything, nothing retrains, the table is unchanged
    capsys.readouterr()
    before = (paper / "table1.csv").read_text()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eqicl._sweep, "RECIPE", SMALL_RECIPE)
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "cold: 4 cells, 4 recorded, 0 to run" in out and "polish: 4 cells, 4 recorded" in out
        assert (paper / "table1.csv").read_text() == before
        # --list: one line per cell, each stage's validation loss and the table's pick
        assert main([*args, "--list", "--models", "gdpp", "--noise", "0"]) == 0
        (line,) = capsys.readouterr().out.splitlines()
        fields = line.split()
        assert (
            fields[0] == "gdpp-L1-u0"
            and fields[-1] == f"table={rows[Cell('gdpp', 1, '0')]['pass']}"
        )
        assert [f.split("=")[0] for f in fields[1:4]] == ["cold", "warm", "polish"]
        assert main([*args, "--list", "--models", "gdpp", "--noise", "0", "--seeds", "2"]) == 0
        assert capsys.readouterr().out.strip().endswith("(asked now: cold.seeds=2 warm.seeds=2)")
        # --cost: per stage, the recorded rows' seconds summed, and the machine they name
        assert main([*args, "--cost"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in lines] == ["cold", "warm", "polish", "all"]
        total = 0.0
        for line, st in zip(lines[:-1], SMALL_RECIPE.stages, strict=True):
            store = paper / "candidates" / st.name
            recorded = read_table(store / "table1.csv")
            train = sum(float(r["train_seconds"]) for r in recorded.values())
            select = sum(
                json.loads((store / "cells" / f"{c.name}.json").read_text())["select_seconds"]
                for c in recorded
            )
            evals = sum(float(r["eval_seconds"]) for r in recorded.values())
            assert line.startswith(f"{st.name:<8} {len(recorded):>4} of 4 cells recorded;")
            assert f"train {train:,.0f} s, validation {select:,.0f} s, eval {evals:,.0f} s" in line
            machine = eqicl._limits.machine_line("float64" if st.name == "polish" else "float32")
            assert line.endswith(f"({machine}: {len(recorded)})")
            total += train + select + evals
        assert lines[-1].endswith(f"{total:,.0f} s in all")
        # the run directories hold runs of one seed: nothing runs, nothing is written
        files = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file())
        assert main([*args, "--force", "--seeds", "2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: 4 run directories under") and "\n" not in err.strip()
        assert "/runs/cold " in err
        assert "(train.seeds: 1 in the directory, 2 asked)" in err and "nothing was run" in err
        assert (
            sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()) == files
        )
    text, counts = compare(paper)
    assert counts["missing"] == 206 and counts["matched"] + counts["beaten"] + counts["missed"] == 4


def test_a_stage_waits_for_inputs_not_recorded_yet(tmp_path, noisy_recipe, capsys):
    """Asked for one noise setting, the warm stage's cells need the cold candidates of the
    neighbouring settings: they wait (one line each) and the polish stage waits for them;
    the cold candidates are recorded and the table holds them. Then the neighbours' cold
    stage and a rerun complete the cell."""
    args = _args(tmp_path)
    assert main(["--models", "gdpp", "--layers", "1", "--noise", "1", *args]) == 0
    out = capsys.readouterr().out
    assert "warm/gdpp-L1-u1 waits for cold/gdpp-L1-u0, cold/gdpp-L1-u2 (not recorded yet)" in out
    assert "polish/gdpp-L1-u1 waits for warm/gdpp-L1-u1 (not recorded yet)" in out
    paper = tmp_path / "paper"
    assert read_table(paper / "table1.csv")[Cell("gdpp", 1, "1")]["pass"] == "cold"
    assert main(["--models", "gdpp", "--layers", "1", "--noise", "1", "--list", *args]) == 0
    line = capsys.readouterr().out.split()
    assert line[2:] == ["warm=waits", "polish=waits", "table=cold"]
    assert main(["--models", "gdpp", "--layers", "1", "--noise", "0,2", *args]) == 0
    out = capsys.readouterr().out
    assert "warm: 2 cells" in out  # u0 and u2 still wait for their other neighbours
    assert main(["--models", "gdpp", "--layers", "1", "--noise", "1", *args]) == 0
    out = capsys.readouterr().out
    assert "warm: 1 cells, 0 recorded, 1 to run" in out and "waits" not in out


def test_bad_sweep_arguments_are_one_line_errors(tmp_path, capsys):
    paper = ["--paper-dir", str(tmp_path / "paper")]
    for args, message in [
        (["--layers", "0"], "unknown layers '0'"),
        (["--set", "train.lrr=1", "--list"], "unknown config key 'train.lrr'"),
        (["--set", "train.lrr=1", "--models", "diag", "--layers", "1"], "unknown config key"),
        (["--noise", ""], "no cells selected"),
        (["--layers", "5-3"], "no cells selected"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--shard", "3/2"], "--shard K/N needs 1 <= K <= N, got '3/2'"),
        (["--shard", "two"], "--shard must be K/N, e.g. 2/8, got 'two'"),
        (["--wait", "5"], "--wait is for --shard K/N"),
        (["--shard", "1/2", "--wait", "-1"], "--wait must be a number of seconds >= 0"),
    ]:
        assert main(args + paper) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "\n" not in err.strip()
    assert not any(tmp_path.iterdir())
    (tmp_path / "file").write_text("x")
    assert main(["--paper-dir", str(tmp_path / "file")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_shards_split_the_cells_disjointly_and_by_cost():
    """`--shard K/N`: the N parts are disjoint, cover every asked cell, do not depend on the
    order the cells were asked in, and share the recipe's cost evenly."""
    from eqicl._sweep import parse_shard, recipe_seeds, shard_cells

    cells = parse_cells("all", "all", "all")
    assert parse_shard("3/8") == (3, 8)

    def cost(c):
        return recipe_steps(c.model, c.layers) * recipe_seeds(c.column) * (c.layers + 2)

    for n in (1, 2, 3, 8):
        parts = [shard_cells(cells, k, n) for k in range(1, n + 1)]
        assert sorted(c for part in parts for c in part) == sorted(cells)
        assert shard_cells(list(reversed(cells)), 1, n) == parts[0]
        loads = [sum(map(cost, part)) for part in parts]
        assert max(loads) - min(loads) <= max(map(cost, cells))  # greedy: within one cell
    # four equal cells: GD++ and DIAG of a noise setting land on different shards, so the
    # DIAG cell's warm start waits for the other shard's GD++ candidate
    small = parse_cells("gdpp,diag", "1", "0,{1;3}")
    assert shard_cells(small, 1, 2) == [Cell("gdpp", 1, "0"), Cell("gdpp", 1, "{1;3}")]
    assert shard_cells(small, 2, 2) == [Cell("diag", 1, "0"), Cell("diag", 1, "{1;3}")]
    assert shard_cells(small, 5, 8) == []


# The small recipe for a sweep in a subprocess (a shard): eqicl.sweep's command line with it.
_SHARD_DRIVER = """
import sys
import eqicl._sweep as s
from eqicl._sweep import Polish, Recipe, Train
s.RECIPE = Recipe((
    Train("cold", max_layers="1"),
    Train("warm", warm=True, starts_from=("cold",)),
    Polish("polish", max_layers="1", starts=2, iterations=3, sequences=300),
))
s.WAIT_POLL = 0.2
from eqicl.sweep import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_shards_on_one_store_make_the_one_process_table(swept, tmp_path, capsys):
    """Two processes, `--shard 1/2` and `--shard 2/2` with `--wait`, on one shared paper
    directory and run root, at the same time (the DIAG cells' warm starts are the other
    shard's GD++ candidates); then the command without `--shard` assembles and scores the
    table, training nothing. Every weights file and every number equals the one-process
    sweep's."""
    import subprocess
    import sys

    import numpy as np

    ref_root, _ = swept
    args = [*CELLS, *_args(tmp_path)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SHARD_DRIVER, *args, "--shard", f"{k}/2", "--wait", "600"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k in (1, 2)
    ]
    outs = [proc.communicate(timeout=900)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    assert "shard 1/2: 2 of the 4 cells" in outs[0] and "shard 2/2: 2 of the 4" in outs[1]
    assert "cold: 2 cells, 0 recorded, 2 to run" in outs[1]
    assert "waits for" not in "".join(outs)  # nothing left over: each waited for the other
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eqicl._sweep, "RECIPE", SMALL_RECIPE)
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "cold: 4 cells, 4 recorded, 0 to run" in out and "polish: 4 cells, 4 recorded" in out
    paper, ref = tmp_path / "paper", ref_root / "paper"
    rows, ref_rows = read_table(paper / "table1.csv"), read_table(ref / "table1.csv")
    assert set(rows) == set(ref_rows) and len(rows) == 4
    timing = ("train_seconds", "eval_seconds")
    for cell, row in rows.items():
        assert {k: v for k, v in row.items() if k not in timing} == {
            k: v for k, v in ref_rows[cell].items() if k not in timing
        }
        with np.load(weights_path(paper, cell)) as a, np.load(weights_path(ref, cell)) as b:
            assert sorted(a.files) == sorted(b.files)
            for name in a.files:
                np.testing.assert_array_equal(a[name], b[name])


def test_the_slurm_example_gives_each_array_task_its_shard(tmp_path):
    """examples/slurm_sweep.sh as an array task runs it: SLURM's task id and count become
    `--shard K/N` on the shared store (`--list`: the cells task K owns, nothing run)."""
    import os
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    owned = []
    for k in (1, 2):
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(k), "SLURM_ARRAY_TASK_COUNT": "2"}
        env.update(STORE=str(tmp_path / "store"), PYTHONPATH=str(root / "src"))
        p = subprocess.run(
            ["bash", str(root / "examples" / "slurm_sweep.sh"), *CELLS, "--list"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr[-2000:]
        owned.append([line.split()[0] for line in p.stdout.splitlines()])
    assert owned == [["gdpp-L1-u0", "gdpp-L1-c1_3"], ["diag-L1-u0", "diag-L1-c1_3"]]
    assert not (tmp_path / "store").exists()  # --list writes nothing


def test_recipes_are_checked():
    with pytest.raises(SweepError, match="not an earlier stage"):
        Recipe((Train("warm", warm=True, starts_from=("cold",)), Train("cold")))
    with pytest.raises(SweepError, match="distinct names"):
        Recipe((Train("a"), Train("a")))
    with pytest.raises(SweepError, match="--max-layers"):
        Recipe((Train("a", max_layers="four"),))
    with pytest.raises(SweepError, match="bad settings"):
        Recipe((Train("a", settings={"lrr": 1.0}),))
    with pytest.raises(SweepError, match="bad settings"):
        Recipe((Train("a", settings={"dtype": "float16"}),))
    # the recipe's coverage: cold has 1-4 layers and FULL at every depth, polish at most 3
    cold, warm, tail, polish = eqicl._sweep.RECIPE.stages
    assert tail.unsound_only and tail.settings["dtype"] == "float64"
    cells = parse_cells("all", "all", "3")
    assert sum(eqicl._sweep.RECIPE.covers(cold, c) for c in cells) == 4 * 3 + 3
    assert all(eqicl._sweep.RECIPE.covers(warm, c) for c in cells)
    assert [c.layers for c in cells if eqicl._sweep.RECIPE.covers(polish, c)] == [1] * 3 + [
        2
    ] * 3 + [3] * 3
    # inputs: a warm cell needs its embedded starts of both stages and the cold neighbours
    inputs = eqicl._sweep.RECIPE.inputs(warm, Cell("diag", 5, "3"))
    assert [(s.name, c.name) for s, c in inputs] == [
        ("cold", "diag-L4-u3"),
        ("warm", "diag-L4-u3"),
        ("warm", "gdpp-L5-u3"),
    ]
    # ... and at 3 layers also the cold candidates of the neighbouring noise settings
    inputs = eqicl._sweep.RECIPE.inputs(warm, Cell("gdpp", 3, "{1;3}"))
    assert [(s.name, c.name) for s, c in inputs] == [
        ("cold", "gdpp-L2-c1_3"),
        ("warm", "gdpp-L2-c1_3"),
        ("cold", "gdpp-L3-u3"),
        ("cold", "gdpp-L3-c1_3_5"),
    ]


def _fake_candidate(d, cell, val, test, tag, config_eval=None):
    row = dict.fromkeys(eqicl._sweep.TABLE_FIELDS, "1")
    row.update(method=cell.row, layers=cell.layers, noise=cell.column, exact=test)
    (d / "cells").mkdir(parents=True, exist_ok=True)
    data = {"selection": {"losses": [9.0, val], "best": 1}}
    if config_eval is not None:
        data["config"] = {"eval": config_eval, "train": {"select_sequences": 10}}
    (d / "cells" / f"{cell.name}.json").write_text(json.dumps(data))
    config = cell_config(cell, None, 1)
    model = eqicl.init_transformer(jr.key(0), config.model, config.task)
    eqicl.save_weights(model, weights_path(d, cell), select_loss=val, tag=tag)
    return row


def test_the_table_and_the_listing_take_a_sound_candidate_over_an_unsound_one(tmp_path):
    """The merge and `--list` rank as every choice does: cold's DIAG candidate has the lower
    validation loss but is unsound on validation, so the table takes warm's, and the listing
    says so (it named the lower loss's stage, not the table's pick)."""
    from eqicl._files import write_csv_atomic as _write_csv

    cell = Cell("diag", 2, "3")
    recipe = Recipe((Train("cold"), Train("warm", warm=True, starts_from=("cold",))))
    paper = tmp_path / "paper"
    for name, (val, test) in {"cold": (0.1, 0.9), "warm": (0.2, 0.05)}.items():
        d = stage_dir(paper, recipe.stage(name))
        _write_csv(
            d / "table1.csv", eqicl._sweep.TABLE_FIELDS, [_fake_candidate(d, cell, val, test, name)]
        )
    path = stage_dir(paper, recipe.stage("cold")) / "cells" / f"{cell.name}.json"
    data = json.loads(path.read_text())
    data["selection"]["sound"] = [True, False]
    path.write_text(json.dumps(data))
    (line,) = listing([cell], paper, None, 1, [], recipe)
    assert line.split()[1:4] == ["cold=0.1(unsound)", "warm=0.2", "table=warm"]
    assert assemble(paper, recipe) == {"cold": 0, "warm": 1}
    assert float(read_table(paper / "table1.csv")[cell]["exact"]) == 0.05


def test_the_table_is_each_cells_best_candidate_by_validation_loss(tmp_path, capsys):
    """Cell by cell the lower validation loss wins (never the test loss); its row, cell file
    and weights are copied and the row names the stage; a stage missing a cell does not
    count; candidates validated by different estimators are refused, not compared."""
    from eqicl._files import write_csv_atomic as _write_csv

    cells = [Cell("diag", 2, "3"), Cell("full", 2, "3")]
    recipe = Recipe((Train("cold"), Train("warm", warm=True, starts_from=("cold",))))
    paper = tmp_path / "paper"
    # (validation, test) per stage: cold wins DIAG on validation although its test loss is worse
    losses = {"cold": {cells[0]: (0.1, 0.9), cells[1]: (0.5, 0.1)}, "warm": {cells[0]: (0.2, 0.05)}}
    losses["warm"][cells[1]] = (0.3, 0.2)
    for name, by_cell in losses.items():
        d = stage_dir(paper, recipe.stage(name))
        rows = [_fake_candidate(d, c, v, t, name) for c, (v, t) in by_cell.items()]
        _write_csv(d / "table1.csv", eqicl._sweep.TABLE_FIELDS, rows)
    lines = listing(cells, paper, None, 1, [], recipe)
    assert [ln.split()[:1] + ln.split()[1:4] for ln in lines] == [
        ["diag-L2-u3", "cold=0.1", "warm=0.2", "table=cold"],
        ["full-L2-u3", "cold=0.5", "warm=0.3", "table=warm"],
    ]
    assert not (paper / "table1.csv").exists()  # listing writes nothing
    assert assemble(paper, recipe) == {"cold": 1, "warm": 1}
    merged = read_table(paper / "table1.csv")
    assert merged[cells[0]]["pass"] == "cold" and float(merged[cells[0]]["exact"]) == 0.9
    assert merged[cells[1]]["pass"] == "warm" and float(merged[cells[1]]["exact"]) == 0.2
    assert eqicl.load_weights(weights_path(paper, cells[0]))[1]["tag"] == "cold"
    data = json.loads((paper / "cells" / f"{cells[1].name}.json").read_text())
    assert data["pass"] == "warm" and data["validation_by_pass"] == {"cold": 0.5, "warm": 0.3}
    text, counts = compare(paper)
    assert "(cold)" in text and "1 from cold, 1 from warm" in text
    # validated by other estimators (a plain and a tail-aware selection): refused
    d = stage_dir(paper, recipe.stage("warm"))
    _fake_candidate(
        d,
        cells[0],
        0.01,
        0.01,
        "warm",
        {"proposal_x": [1.0, 1.5], "proposal_w": [1.0, 1.0], "proposal_shares": [0.5, 0.5]},
    )
    _fake_candidate(stage_dir(paper, recipe.stage("cold")), cells[0], 0.1, 0.9, "cold", {})
    with pytest.raises(SweepError, match="estimated differently"):
        assemble(paper, recipe)


def _recorded_candidate(paper, stage, cell, source, extra):
    """`source` (a weights file) recorded as `stage`'s candidate of `cell`, as a stage would."""
    import shutil

    from eqicl._files import write_csv_atomic as _write_csv, write_json_atomic as _write_json

    d = stage_dir(paper, stage)
    weights_path(d, cell).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, weights_path(d, cell))
    config = cell_config(cell, None, 1, extra)
    _write_json(
        d / "cells" / f"{cell.name}.json",
        {"config": config.to_dict(), "selection": {"losses": [0.1], "rank": [0], "best": 0}},
    )
    rows = read_table(d / "table1.csv")
    row = dict.fromkeys(eqicl._sweep.TABLE_FIELDS, "1")
    rows[cell] = {**row, "method": cell.row, "layers": cell.layers, "noise": cell.column}
    _write_csv(d / "table1.csv", eqicl._sweep.TABLE_FIELDS, rows.values())


def test_the_tail_stage_trains_only_cells_unsound_on_validation(tmp_path):
    """A stage with `unsound_only` trains a cell only if its best earlier candidate is
    unsound on the plain validation draw (the committed DIAG 3 layers at sigma_max = 6 is: on
    400,000 sequences a few blown-up ones make its mean imprecise); a sound one (GD++ of the
    same cell) is recorded as skipped with why, and the table keeps the earlier candidate.
    The trained cell uses the stage's settings (importance-weighted batches, float64)."""
    from eqicl._run import read_run_config

    paper, extra = tmp_path / "paper", [*SMALL, "train.select_sequences=400000"]
    tail = Train("tail", settings=eqicl._sweep.TAIL_SETTINGS, unsound_only=True)
    recipe = Recipe((Train("cold", max_layers="3"), tail))
    cells = [Cell("gdpp", 3, "6"), Cell("diag", 3, "6")]
    for cell in cells:
        source = f"runs/paper/weights/{cell.name}.npz"
        _recorded_candidate(paper, recipe.stage("cold"), cell, source, extra)
    assert recipe.inputs(tail, cells[1]) == [(recipe.stage("cold"), cells[1])]
    lines = []
    eqicl._sweep.run_recipe(
        cells,
        paper,
        tmp_path / "runs",
        extra=extra,
        echo=lines.append,
        progress=False,
        recipe=recipe,
    )
    rows = read_table(stage_dir(paper, tail) / "table1.csv")
    assert rows[cells[0]]["status"] == "skipped" and rows[cells[1]]["status"] == "ok"
    assert any(
        "tail/gdpp-L3-u6: not needed (cold's candidate is sound on the" in ln for ln in lines
    )
    data = json.loads((stage_dir(paper, tail) / "cells" / "gdpp-L3-u6.json").read_text())
    assert data["skipped"]["stage"] == "cold" and data["skipped"]["validation"]["max"] < 1000
    assert not weights_path(stage_dir(paper, tail), cells[0]).exists()
    trained = read_run_config(tmp_path / "runs" / "tail" / "diag-L3-u6").train
    assert trained.dtype == "float64" and trained.proposal_x == (1.0, 1.1, 1.2)
    assert trained.steps == 20  # the user's --set comes after the stage's settings
    table = read_table(paper / "table1.csv")
    assert table[cells[0]]["pass"] == "cold"
    (line,) = listing(cells[:1], paper, None, None, extra, recipe)
    assert "tail=not-needed table=cold" in line
    # recorded: a rerun trains nothing
    lines.clear()
    eqicl._sweep.run_recipe(
        cells,
        paper,
        tmp_path / "runs",
        extra=extra,
        echo=lines.append,
        progress=False,
        recipe=recipe,
    )
    assert "tail: 2 cells, 2 recorded, 0 to run" in lines


def test_validation_verdicts():
    """The rule every choice ranks by (`eqicl._evaluate.verdict`): unsound if the plain draw
    is not finite, carried or imprecise (se scaled to the table's 1,000,000 sequences); tail
    if the proposal's estimate exceeds the plain one by more than 10 % plus two standard
    errors of the difference; sound otherwise. A large single loss alone is not unsound."""
    from eqicl._evaluate import SOUND, TAIL, UNSOUND, verdict

    plain = {"finite": True, "mean": 0.1, "se": 0.001, "top_share": 0.02, "max": 3.0}
    plain["sequences"] = 400_000
    est = {**plain, "tail": {**plain, "mean": 0.105}}
    assert verdict(est) == (SOUND, None)
    assert verdict({**est, "max": 2e7})[0] == SOUND  # the largest loss alone says nothing
    rank, why = verdict({**est, "top_share": 0.6})
    assert rank == UNSOUND and why.startswith(
        "on the plain validation draw: the top 0.1 % carries 60%"
    )
    assert verdict({**est, "top_share": 0.6, "max": 0.4})[0] == SOUND  # tiny losses
    assert verdict({**est, "finite": False}) == (
        UNSOUND,
        "on the plain validation draw: not finite",
    )
    # se 0.0079 on 400,000 sequences is 0.0050 on 1,000,000: 5 % of 0.1 is the edge.
    assert verdict({**est, "se": 0.0078})[0] == SOUND
    rank, why = verdict({**est, "se": 0.0080})
    assert rank == UNSOUND and "imprecise" in why
    small = {**plain, "mean": 1e-4, "se": 3e-4}  # 1.9e-4 on 1M: below 0.0002
    assert verdict({**small, "tail": small})[0] == SOUND
    assert verdict({**small, "se": 3.2e-4, "tail": small})[0] == UNSOUND
    # The tail: allowed 0.1 * 0.1 + 2 * hypot(0.001, 0.001) = 0.012828... above the plain mean.
    assert verdict({**est, "tail": {**plain, "mean": 0.1128}})[0] == SOUND
    rank, why = verdict({**est, "tail": {**plain, "mean": 0.1129}})
    assert rank == TAIL and "rare sequences carry" in why
    assert verdict({**est, "tail": {**plain, "mean": math.inf, "finite": False}})[0] == TAIL
    assert verdict({**est, "tail": {**plain, "mean": 0.05}})[0] == SOUND  # lower: no tail
    # A proposal estimate carried by one sequence has a standard error as large as its mean:
    # it is a tail whatever the difference's standard errors say (FULL 5L σ0 of the third
    # rerun: 0.0106 ± 0.00014 plain, 1.38e18 ± 1.38e18 on the proposal's draw, top 100 %).
    carried = {**plain, "mean": 1.38e18, "se": 1.38e18, "top_share": 1.0, "max": 5.6e28}
    rank, why = verdict({**est, "tail": carried})
    assert rank == TAIL and "proposal's validation draw: the top 0.1 % carries 100%" in why
    rank, why = verdict({**est, "tail": {**plain, "mean": 0.1, "se": 0.02}})
    assert rank == TAIL and "imprecise" in why
    assert verdict(plain) == (SOUND, None)  # a plain proposal: no tail estimate


def test_select_estimates_rank_on_a_plain_draw_and_the_proposals(monkeypatch):
    """The validation estimate's mean is a plain draw's, from its own key (not the
    proposal's or the test's); the proposal's importance-weighted estimate is beside it."""
    import eqicl._evaluate as ev

    config = cell_config(Cell("gdpp", 1, "0"), None, 1, ["train.select_sequences=300"])
    model = eqicl.init_transformer(jr.key(0), config.model, config.task)
    stacked = eqicl._sweep._stack([model, model])
    calls = []
    real = ev.estimate_all

    def spy(models, task, key, sequences, proposal, chunk):
        calls.append((jr.key_data(key).tolist(), sequences, proposal.plain))
        return real(models, task, key, sequences, proposal, chunk)

    monkeypatch.setattr(ev, "estimate_all", spy)
    est = ev.select_estimates(ev.cast(stacked, ev.eval_dtype()), config)
    keys = ev.eval_keys(config)
    assert calls == [
        (jr.key_data(keys["validation"]).tolist(), 300, True),
        (jr.key_data(keys["select"]).tolist(), 300, False),
    ]
    assert len(est) == 2 and est[0]["mean"] == est[1]["mean"]  # the same sequences
    assert est[0]["sequences"] == est[0]["tail"]["sequences"] == 300
    assert est[0]["ess"] == 300 and est[0]["tail"]["ess"] < 300  # plain, then weighted
    distinct = {tuple(jr.key_data(k).tolist()) for k in keys.values()}
    assert len(distinct) == len(keys)


def test_a_sound_candidate_wins_over_an_unsound_one_with_a_lower_loss(tmp_path):
    """The first rerun's bug: a cell's tail stage trained a sound candidate because the
    earlier ones explode on validation, and then polish and the merge took an exploding one
    again for its lower validation mean. Every choice ranks unsound candidates (carried or
    imprecise on the plain draw) last, then by the plain validation mean, that of one only
    the proposal's draw finds carried raised by 10 %."""
    from eqicl._evaluate import SOUND, TAIL, UNSOUND, selection_keys, selection_record
    from eqicl._sweep import _best_source, validation_key

    plain = {"finite": True, "mean": 0.1, "se": 0.001, "top_share": 0.02, "max": 3.0}
    plain["sequences"] = 400_000
    est = {**plain, "tail": plain}
    candidates = [
        {**est, "top_share": 0.9},
        {**est, "mean": 0.2, "tail": {**plain, "mean": 0.2}},
        {**est, "mean": math.nan},
        {**est, "mean": 0.15, "tail": {**plain, "mean": 9.0}},
    ]
    keys = selection_keys(candidates)
    assert keys == [(True, 0.1), (False, 0.2), (True, math.inf), (False, 0.15 * 1.1)]
    assert sorted(range(4), key=lambda k: keys[k]) == [3, 1, 0, 2]
    # Carried only on the proposal's draw, it wins over a sound one only by more than 10 %.
    close = {**est, "mean": 0.19, "tail": {**plain, "mean": 9.0}}
    assert selection_keys([candidates[1], close]) == [(False, 0.2), (False, 0.19 * 1.1)]
    assert min(range(2), key=lambda k: selection_keys([candidates[1], close])[k]) == 0
    rec = selection_record(candidates)
    assert rec["rank"] == [UNSOUND, SOUND, UNSOUND, TAIL]
    assert rec["sound"] == [False, True, False, False]
    assert rec["why"][1] is None and "rare sequences" in rec["why"][3]
    assert rec["validation"][3]["tail"]["mean"] == 9.0
    json.dumps(rec, allow_nan=True)  # a record's selection is JSON

    cell = Cell("diag", 3, "6")

    def record(name, loss, sound=None, rank=None):
        d = tmp_path / name / "cells"
        d.mkdir(parents=True)
        selection = {"losses": [loss], "best": 0}
        if sound is not None:
            selection["sound"] = [sound]
        if rank is not None:
            selection["rank"] = [rank]
        (d / f"{cell.name}.json").write_text(json.dumps({"selection": selection}))
        return tmp_path / name

    cold, tail, old = (
        record("cold", 0.114, False),
        record("tail", 0.152, True),
        record("old", 0.13),
    )
    warm = record("warm", 0.12, False, TAIL)
    assert validation_key(cold, cell) == (True, 0.114)  # `sound` only: sound or unsound
    assert validation_key(old, cell) == (False, 0.13)  # recorded before soundness: sound
    assert validation_key(warm, cell) == (False, 0.12 * 1.1)  # 0.132: behind old's 0.13
    assert _best_source([cold, tail], cell) == tail
    assert _best_source([cold, warm], cell) == warm
    assert _best_source([cold, tail, old, warm], cell) == old
    assert _best_source([cold], cell) == cold  # unsound, but the only one


def test_figure5_cells_train_five_seeds_and_record_each(tmp_path):
    """At sigma_max = 5 the recipe trains 5 seeds (Figure 5's bands), keeps the best by
    validation loss and records every seed's test estimate; elsewhere one seed."""
    assert eqicl._sweep.recipe_seeds("5") == 5 and eqicl._sweep.recipe_seeds("{1;3;5}") == 1
    paper, recipe = tmp_path / "paper", Recipe((Train("cold", max_layers="1"),))
    cell = Cell("gdpp", 1, "5")
    eqicl._sweep.run_recipe(
        [cell],
        paper,
        tmp_path / "runs",
        extra=SMALL,
        echo=lambda _: None,
        progress=False,
        recipe=recipe,
    )
    row = read_table(paper / "table1.csv")[cell]
    data = json.loads((paper / "cells" / f"{cell.name}.json").read_text())
    seeds = data["seed_losses"]
    assert row["seeds"] == "5" and len(seeds) == 5 and len(data["selection"]["losses"]) == 5
    assert all(math.isfinite(s["mean"]) and s["se"] > 0 for s in seeds)
    assert len({s["mean"] for s in seeds}) == 5  # five trained models, not one
    assert all(s["after_layer"][-1]["mean"] == s["mean"] for s in seeds)
    best = seeds[int(row["best_seed"])]  # the same model on another test draw of its law
    assert abs(best["mean"] - float(row["exact"])) < 5 * (best["se"] + float(row["exact_se"]))
    # Figure 5 shades the band the five seeds span, around the recorded (best) model
    from analysis.figures import _seed_band, figure5

    low, high = _seed_band(data)
    assert low[-1] == min(s["mean"] for s in seeds) and high[-1] == max(s["mean"] for s in seeds)
    fig = figure5(paper)
    assert len(fig.axes[0].collections) == 1 and len(fig.axes[-1].collections) == 1


def test_the_tables_score_is_what_reeval_finds_on_its_seed(swept, tmp_path):
    """The sweep's last step and `python -m analysis.reeval` score a cell's weights on the
    same draw of the test seed; a changed weights file is scored again, an unchanged one not."""
    import shutil

    import equinox as eqx

    from analysis.reeval import main as reeval

    paper = tmp_path / "paper"
    shutil.copytree(swept[0] / "paper", paper)
    out = tmp_path / "r"
    args = ["--paper-dir", str(paper), "--seed", "2027", "--sequences", "600", "--out", str(out)]
    assert reeval([*args, "--no-progress"]) == 0
    with open(out.with_suffix(".csv")) as f:
        again = {(r["method"], r["layers"], r["noise"]): r for r in csv.DictReader(f)}
    rows = read_table(paper / "table1.csv")
    for row in rows.values():
        r = again[(row["method"], row["layers"], row["noise"])]
        assert float(r["plain"]) == float(row["test"])
        assert float(r["tail"]) == float(row["test_tail"])
    # --recorded judges those recorded columns by the same rule, scoring nothing
    rec = tmp_path / "rec"
    assert reeval(["--paper-dir", str(paper), "--recorded", "--out", str(rec)]) == 0
    with open(rec.with_suffix(".csv")) as f:
        judged = {(r["method"], r["layers"], r["noise"]): r for r in csv.DictReader(f)}
    assert judged.keys() == again.keys()
    verdicts = ("plain", "plain_se", "tail", "tail_se", "tail_top", "below_bar", "precise")
    for key, r in judged.items():
        assert [r[k] for k in (*verdicts, "carried", "holds", "plain_holds")] == [
            again[key][k] for k in (*verdicts, "carried", "holds", "plain_holds")
        ]
    assert "test seed 2027, 600 sequences" in rec.with_suffix(".md").read_text()

    def score(seed):
        return eqicl._score.score_table(paper, seed, 600, echo=lambda _: None, progress=False)

    assert score(2027) == 0
    cell = Cell("gdpp", 1, "0")
    model, _ = eqicl.load_weights(weights_path(paper, cell))
    halved = jax.tree.map(lambda a: a * 0.5 if eqx.is_array(a) else a, model)
    eqicl.save_weights(halved, weights_path(paper, cell))
    # a row scored for other weights is left out of --recorded, and said
    assert reeval(["--paper-dir", str(paper), "--recorded", "--out", str(rec)]) == 0
    with open(rec.with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == len(judged) - 1
    assert f"changed since they were scored: {cell.name}" in rec.with_suffix(".md").read_text()
    assert score(2027) == 1
    assert read_table(paper / "table1.csv")[cell]["test"] != rows[cell]["test"]
    assert score(2028) == 4
