"""The installed package finds its configuration files, and every console command leads to a ``main``.

conf/ lives at the top of the checkout; the wheel must carry it as ``alignfl_app/conf`` (pyproject maps it),
and the FAB of ``flwr run .`` must carry it as ``conf/`` (the app reads it there).
"""

import io
import tomllib
import zipfile
from fnmatch import fnmatch

import pytest

from alignfl_app.cli import COMMANDS, command_main, main
from alignfl_app.resources import conf_dir
from tests.conftest import PROJECT


def test_conf_dir_holds_the_shipped_architectures_and_experiments():
    assert {p.stem for p in (conf_dir() / "architectures").glob("*.toml")} >= {"mlp", "mlp-small", "conv"}
    assert {p.stem for p in (conf_dir() / "experiments").glob("*.toml")} >= {"mnist-fast", "mnist-paper"}


def test_wheel_carries_every_conf_file_as_package_data():
    setuptools = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["alignfl_app.conf"] == "conf"
    files = [p.relative_to(PROJECT / "conf") for p in (PROJECT / "conf").rglob("*") if p.is_file()]
    assert files
    for file in files:  # conf/<sub>/<name> ships as package alignfl_app.conf.<sub>, data <name>
        package = ".".join(("alignfl_app.conf", *file.parent.parts))
        assert package in setuptools["packages"], file
        assert any(fnmatch(file.name, pattern) for pattern in setuptools["package-data"].get(package, [])), file


def test_flwr_run_fab_carries_conf_and_the_tools():
    from flwr.cli.build import build_fab_from_disk

    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(PROJECT))).namelist())
    assert {
        "conf/architectures/conv.toml",
        "conf/experiments/mnist-fast.toml",
        "alignfl_app/resources.py",
        "alignfl_app/tools/local_superlink.py",
    } <= names
    assert not any(n.startswith(("build/", ".venv/")) for n in names)


def test_every_command_is_listed_and_has_a_main(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listing = capsys.readouterr().out
    for name in COMMANDS:
        assert name in listing
        assert callable(command_main(name))


def test_the_wheel_lists_every_python_package():
    setuptools = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {".".join(p.parent.relative_to(PROJECT).parts) for p in PROJECT.glob("*_app/**/__init__.py")}
    assert packages and packages <= set(setuptools["packages"]), packages - set(setuptools["packages"])
