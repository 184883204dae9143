"""The package as installed: its console scripts resolve to the CLIs' main functions, and it
marks itself typed."""

import importlib
import pathlib
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_is_the_cli(name, capsys):
    """Each console script is the `main` of a `python -m` CLI: `--help` prints its usage."""
    module, function = SCRIPTS[name].split(":")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_the_package_is_marked_typed():
    import eqicl

    assert (pathlib.Path(eqicl.__file__).parent / "py.typed").is_file()
