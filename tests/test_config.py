import json

import pytest

import eqicl
from eqicl import ConfigError, RunDirError
from eqicl._run import prepare_run_dir
from eqicl.train import main


def test_overrides_are_typed():
    c = eqicl.preset(
        "tiny",
        [
            "train.lr=1e-3",
            "model.layers=5",
            "task.noise=categorical",
            "task.sigma_set=1,3,5",
            "seed=7",
        ],
    )
    assert c.train.lr == 1e-3 and isinstance(c.train.lr, float)
    assert c.model.layers == 5 and isinstance(c.model.layers, int)
    assert c.task.sigma_set == (1.0, 3.0, 5.0)
    assert c.seed == 7
    assert eqicl.Config.from_dict(json.loads(c.to_json())) == c


def test_cross_field_checks_run_after_all_overrides():
    c = eqicl.preset("tiny", ["train.checkpoint_every=30", "train.steps_per_call=15"])
    assert (c.train.checkpoint_every, c.train.steps_per_call) == (30, 15)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'"),
        (["trian.lr=1"], "unknown config section 'trian'"),
        (["lr=1"], "unknown config key 'lr'"),
        (["train.lr"], "not of the form"),
        (["model.layers=abc"], "model.layers must be an integer"),
        (["model.layers=2.5"], "model.layers must be an integer"),
        (["model.layers=0"], "model.layers must be >= 1"),
        (["model.kind=mlp"], "model.kind must be one of"),
        (["task.sigma_max=-1"], "task.sigma_max must be finite and >= 0"),
        (["task.n=0"], "task.n must be >= 1"),
        (["task.noise=categorical", "task.sigma_set="], "task.sigma_set must hold at least one"),
        (["task.noise=fixed", "task.sigma=-0.5"], "task.sigma must be finite and >= 0"),
        (["train.lr=0"], "train.lr must be positive"),
        (["train.checkpoint_every=15"], "must be a multiple of train.steps_per_call"),
        (["train.loss_cap=gentle"], "train.loss_cap must be"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        eqicl.preset("tiny", overrides)
    assert "\n" not in str(info.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        eqicl.preset("huge")


def test_cli_error_is_one_line_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["--preset", "tiny", "--run-dir", str(run_dir), "--set", "model.kind=mlp"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.kind must be one of") and "\n" not in err
    assert not run_dir.exists()


def test_run_dir_with_another_config_is_refused(tmp_path):
    a = eqicl.preset("tiny")
    b = eqicl.preset("tiny", ["train.lr=0.5"])
    prepare_run_dir(tmp_path / "run", a)
    before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(
        RunDirError, match=r"different config \(train.lr: 0.01 in the directory, 0.5 asked\)"
    ):
        prepare_run_dir(tmp_path / "run", b)
    assert (tmp_path / "run" / "config.json").read_text() == before
    prepare_run_dir(tmp_path / "run", a)  # the same config resumes


def test_non_run_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty and is not an eqicl run directory"):
        prepare_run_dir(tmp_path, eqicl.preset("tiny"))
    with pytest.raises(RunDirError, match="not an eqicl run directory"):
        eqicl.read_run_config(tmp_path)


def test_cli_help_config_files_and_print_config(tmp_path, capsys):
    """--help lists every config field; --print-config needs no run directory; --config reads
    a --print-config output or a run's config.json (--set on top); training needs --run-dir."""
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    config = eqicl.preset("default")
    for section in ("task", "model", "train", "eval"):
        for name in getattr(config, section).__dataclass_fields__:
            assert f"  {section}.{name}=" in out
    assert main(["--preset", "tiny", "--print-config", "--set", "model.layers=4"]) == 0
    printed = capsys.readouterr().out
    saved = tmp_path / "c.json"
    saved.write_text(printed)
    assert main(["--config", str(saved), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(printed)
    run_dir = prepare_run_dir(tmp_path / "run", eqicl.preset("tiny", ["train.lr=0.5"]))
    assert (
        main(["--config", str(run_dir / "config.json"), "--print-config", "--set", "seed=3"]) == 0
    )
    got = eqicl.Config.from_dict(json.loads(capsys.readouterr().out))
    assert got == eqicl.preset("tiny", ["train.lr=0.5", "seed=3"])
    assert main(["--config", str(saved)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --run-dir is required to train (only --print-config works without)"
    )
    assert main(["--config", str(tmp_path / "none.json"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "No such file" in capsys.readouterr().err
