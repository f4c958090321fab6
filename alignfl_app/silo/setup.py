"""Where a silo's identity comes from: its own side, never the run config.

A silo's name, its folder (policy, ledger, reports, state), its data folder and data root come from:

* a deployed SuperNode: its node config (``flower-supernode --node-config``), which must name the silo
  (``silo-name``); its folder is ``silo-dir``, else ``<silos root>/<silo-name>``;
* a simulated SuperNode (Flower hands it ``partition-id`` and ``num-partitions`` only): this machine. Its folder is
  ``<silos root>/silo-<partition-id>`` (the silos root is ``$ALIGNFL_SILOS_ROOT``, else ``~/.cache/alignfl/silos``)
  and its own node config is the ``node-config.toml`` kept in that folder, which ``alignfl run`` writes when it
  sets up a new simulated silo (``provision_simulated_silos``) and never rewrites.

The run config only asks: which classes and architecture to train, whether and how privately (the silo's policy
decides). ``silo-names``, ``silo-data-dirs`` and ``data-root`` describe a simulated federation to ``alignfl run``
and to the offline tools; the ClientApp never reads them.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from alignfl_app.config import ConfigError, RunConfig, SiloNodeConfig, parse_node_config, silos_root
from alignfl_app.silo.folder import NODE_CONFIG_FILE

SIMULATION_KEYS = frozenset({"partition-id", "num-partitions"})  # all a Flower simulation gives a SuperNode
MACHINE_KEYS = ("partition-id", "num-partitions", "silo-dir")  # a simulated silo's file cannot set these


def is_simulated(node_config: Mapping[str, Any]) -> bool:
    """A SuperNode of a simulation: Flower gave it ``partition-id`` and ``num-partitions`` and nothing else."""
    return set(node_config) == SIMULATION_KEYS


def simulated_silo_dir(partition_id: int, root: Path | None = None) -> Path:
    return (root or silos_root()) / f"silo-{partition_id}"


def read_own_node_config(folder: Path) -> dict[str, Any]:
    """A simulated silo's own node config (``<folder>/node-config.toml``), or {} when it has none."""
    path = folder / NODE_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"{path}: not a readable TOML file ({type(exc).__name__}); fix the silo's node config"
        ) from exc
    fixed = [k for k in MACHINE_KEYS if k in raw]
    if fixed:
        raise ConfigError(
            f"{path}: '{fixed[0]}' comes from the machine (the folder and Flower's partition), not "
            "from the silo's file: remove it"
        )
    return raw


def silo_node_config(node_config: Mapping[str, Any]) -> SiloNodeConfig:
    """The silo's own config: a deployed SuperNode's node config, or a simulated one's folder and file."""
    raw = dict(node_config)
    if is_simulated(raw):
        folder = simulated_silo_dir(int(raw["partition-id"]))
        return parse_node_config({**read_own_node_config(folder), **raw, "silo-dir": str(folder)})
    node = parse_node_config(raw)
    if not node.silo_name:
        raise ConfigError(
            "node config: silo-name is missing: a deployed silo names itself, e.g. flower-supernode "
            "--node-config 'partition-id=0 silo-name=\"hospital-a\" ...'"
        )
    return node


def launch_node_configs(cfg: RunConfig, project_dir: Path | None = None) -> list[dict[str, str]]:
    """What a simulated federation's launch asks of silo k: its name (``silo-names``), data folder
    (``silo-data-dirs``) and data root (``data-root``), paths resolved as the run resolves them."""
    data = cfg.data
    wanted = []
    for k, name in enumerate(data.names):
        own = {"silo-name": name}
        folder = data.resolved_silo_data_dir(k, project_dir) if data.is_folder else None
        if folder is not None:
            own["data-dir"] = str(folder)
        if data.data_root:
            own["data-root"] = str(data.resolved_data_root())
        wanted.append(own)
    return wanted


def provision_simulated_silos(root: Path, cfg: RunConfig, project_dir: Path | None = None) -> list[Path]:
    """Set up the silos of a simulated federation under ``root`` as ``cfg`` describes them: a new silo gets a
    ``node-config.toml``; an existing one keeps its own and must agree with the launch (ConfigError, one line
    naming the folder, otherwise). Returns the silos' folders."""
    folders = []
    for k, wanted in enumerate(launch_node_configs(cfg, project_dir)):
        folder = simulated_silo_dir(k, root)
        path = folder / NODE_CONFIG_FILE
        if path.is_file():
            own = read_own_node_config(folder)
        elif folder.is_dir() and any(folder.iterdir()):
            own = {"silo-name": f"silo-{k}"}  # a silo with history and no file: its default name, nothing else
        else:
            own = None
        if own is None or not path.is_file() and own["silo-name"] == wanted["silo-name"]:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(tomli_w.dumps({**(own or {}), **wanted}))
        else:
            differs = [key for key in wanted if own.get(key) != wanted[key]]
            if differs:
                key = differs[0]
                raise ConfigError(
                    f"simulated silo {folder} is set up with {key}={own.get(key)!r} (its {NODE_CONFIG_FILE}), not "
                    f"{wanted[key]!r}: start from fresh silos (another --silos folder) or change that file"
                )
        folders.append(folder)
    return folders
