"""The ``alignfl`` command: one subcommand per tool, which hands the rest of the command line to its module's ``main``.

A module is imported only when its subcommand runs, so ``alignfl --help`` loads neither torch nor Flower.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

# subcommand -> (module whose ``main(argv) -> int`` runs it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("alignfl_app.tools.local_superlink", "flwr run the app on a private local SuperLink"),
    "fetch": ("alignfl_app.data.datasets", "fetch and verify MNIST / Fashion-MNIST"),
    "export": ("alignfl_app.data.export", "write MNIST / Fashion-MNIST silos as ImageFolders (folder datasets)"),
    "compare": ("alignfl_app.tools.compare", "run every method on one experiment, write the tables"),
    "benchmark": ("alignfl_app.tools.benchmark", "time, bytes and memory per method; silo scaling"),
    "sweep": ("alignfl_app.tools.privacy_sweep", "privacy-utility sweep: epsilon x Lipschitz x dataset"),
    "audit": ("alignfl_app.audit.outliers", "recompute a run's decoder-only outlier audit"),
    "reference": ("alignfl_app.reference", "train the local-only and centralised references"),
    "check-node-config": ("client_app.node_config", "check a silo's --node-config before it starts"),
    "canary-audit": ("alignfl_app.tools.canary_audit", "epsilon lower bound of a silo's decoder from canaries"),
    "bench-dp": ("alignfl_app.tools.bench_dp", "time DP vs non-DP local training"),
    "gpu-check": ("alignfl_app.tools.gpu_check", "a short federation on CUDA beside the CPU: samples/s"),
    "liveness-check": (
        "alignfl_app.tools.liveness_check",
        "5 real SuperNodes: one killed, then all killed and resumed: round times, losses",
    ),
    "attack-bench": (
        "alignfl_app.tools.attack_bench",
        "five silos, one attacker: what each attack on the server costs",
    ),
    "load-test": ("alignfl_app.tools.load_test", "many-silo simulation: wall time and peak memory"),
    "fleet-front": ("alignfl_app.tools.fleet_front", "the coordinator's silo-facing port: Fleet API only"),
    "withdraw": ("alignfl_app.server.operator", "withdraw a silo from a run: out of the store from the next round"),
    "app-signing": ("alignfl_app.tools.app_signing", "the operator's app signing key; sign the app silos run"),
}


def command_main(name: str) -> Callable[[list[str]], int]:
    """The ``main`` of subcommand ``name``'s module."""
    return importlib.import_module(COMMANDS[name][0]).main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="alignfl",
        description="ALIGN-FL: run, compare and check the Flower app.",
        epilog="'alignfl COMMAND --help' shows a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_line) in COMMANDS.items():
        # no options of its own: every argument after the command goes to the command's parser
        commands.add_parser(name, help=help_line, add_help=False)
    args, rest = parser.parse_known_args(argv)
    return command_main(args.command)(rest)


if __name__ == "__main__":  # python -m alignfl_app.cli: where the alignfl script is not installed
    raise SystemExit(main())
