"""Check a silo's ``--node-config`` before its SuperNode starts: one line naming the fix, or OK.

    alignfl check-node-config 'partition-id=0 silo-name="hospital-a" architecture="conv"'
    alignfl check-node-config silo-a.toml

Parses exactly as ``flower-supernode --node-config`` does, then validates with ``SiloNodeConfig``
and checks what the silo's machine itself must provide (architecture file, data folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flwr.common.config import parse_config_args

from alignfl_app.config import ConfigError, SiloNodeConfig, load_architecture
from alignfl_app.resources import conf_dir
from alignfl_app.silo.setup import silo_node_config


def check_node_config(text: str) -> SiloNodeConfig:
    """The validated node config, or ConfigError with a one-line reason."""
    try:
        raw = parse_config_args([text])
    except Exception as exc:  # flwr raises click/TOML errors with multi-line text
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"node config: not 'key=value ...' or a .toml file ({first}); quote strings, e.g. silo-name=\"hospital-a\""
        ) from exc
    node = silo_node_config(raw)
    if node.architecture:
        load_architecture(node.architecture, conf_dir() / "architectures")
    if node.data_root and not Path(node.data_root).expanduser().is_dir():
        raise ConfigError(
            f"node config: data-root '{node.data_root}' is not a folder on this machine; "
            "fetch the data there (alignfl fetch --root ...) or fix the path"
        )
    if node.data_dir and not Path(node.data_dir).expanduser().is_dir():
        raise ConfigError(
            f"node config: data-dir '{node.data_dir}' is not a folder on this machine; "
            "point it at the silo's ImageFolder (one sub-folder of images per class)"
        )
    return node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignfl check-node-config", description=__doc__.splitlines()[0])
    parser.add_argument("node_config", help="'key=value ...' as for flower-supernode --node-config, or a .toml file")
    args = parser.parse_args(argv)
    try:
        node = check_node_config(args.node_config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"OK {node.model_dump(by_alias=True, exclude_none=True)}")
    return 0
