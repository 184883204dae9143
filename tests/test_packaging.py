"""The package as installed: its console scripts resolve to the CLIs' main functions, and it
marks itself typed."""

import importlib
import pathlib
import sysconfig
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


def test_every_package_lives_under_src():
    """One package root: an editable install is then a plain path in a .pth file, which type
    checkers outside the repository resolve (a mixed src/ and . layout needs an import hook)."""
    import analysis
    import bench
    import eqicl

    roots = {pathlib.Path(m.__file__).resolve().parents[1] for m in (eqicl, analysis, bench)}
    assert roots == {ROOT / "src"}
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    for pth in site.glob("__editable__*eqicl*.pth"):
        lines = [line for line in pth.read_text().splitlines() if line.strip()]
        assert lines == [str(ROOT / "src")], f"{pth.name} is an import hook: {lines}"
