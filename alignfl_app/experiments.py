"""Experiment files: ``conf/experiments/<name>.toml`` are flat run-config override files.

The same file drives ``flwr run . --run-config conf/experiments/<name>.toml`` and the ``alignfl`` commands
that run without Flower (reference classifiers, comparison, benchmark), so every method sees the same settings.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from alignfl_app.config import ConfigError, RunConfig, parse_run_config
from alignfl_app.resources import conf_dir

EXPERIMENTS_DIR = conf_dir() / "experiments"


def app_defaults() -> dict[str, Any]:
    """The defaults of every run-config key, as Flower flattens ``[tool.flwr.app.config]`` (which equals them)."""
    return RunConfig().flat()


def experiment_path(name_or_path: str) -> Path:
    """A name in conf/experiments/ or a path to a TOML file; unknown names list the known ones."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = EXPERIMENTS_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))
        raise ConfigError(f"no experiment '{name_or_path}': add {path} or use one of {known}")
    return path


def experiment_overrides(name_or_path: str) -> dict[str, Any]:
    """The file's keys, checked against the app's config keys (Flower would reject unknown ones too)."""
    path = experiment_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the file") from exc
    unknown = sorted(set(raw) - set(app_defaults()))
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}: use keys of [tool.flwr.app.config] in pyproject.toml")
    return raw


def toml_value(v: Any) -> str:
    """A run-config value as flwr's ``--run-config 'k=v ...'`` parses it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return "'" + v.replace("'", "") + "'"
    return repr(v)


def run_config_string(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def load_experiment(name_or_path: str | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """pyproject defaults <- experiment file <- explicit overrides, validated."""
    raw = app_defaults()
    if name_or_path:
        raw.update(experiment_overrides(name_or_path))
    raw.update(overrides or {})
    return parse_run_config(raw)


def add_overrides_option(parser: argparse.ArgumentParser, help_text: str = "run-config overrides") -> None:
    """``--set KEY=VALUE ...``, repeatable: every ``--set`` adds its assignments (a later one wins per key)."""
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help=help_text)


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings (TOML values: 5, 0.1, true, 'text'); bare words are strings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value, e.g. num-server-rounds=2")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out
