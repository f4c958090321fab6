"""A real deployment on one machine, built with the deploy/ scripts exactly as docs/deployment.md tells users to."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alignfl_app.tools.local_superlink import (
    BIN,
    SimulationLink,
    flower_env,
    free_port,
    start_logged,
    stop_process,
    wait_for_port,
)
from tests.conftest import PROJECT

DEPLOY = PROJECT / "deploy"
OPERATOR_KEY = "operator"


def deploy_script(name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run one of ``deploy/*.sh`` (the scripts the deployment guide tells users to run); raise on failure."""
    res = subprocess.run(
        [str(DEPLOY / name), *args],
        cwd=PROJECT,
        env={**env, "ALIGNFL_BIN": str(BIN)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if res.returncode != 0:
        raise RuntimeError(f"deploy/{name} {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


class DeploymentFederation(SimulationLink):
    """A SuperLink on loopback behind the fleet front, and real ``flower-supernode`` processes, all on loopback.

    Everything the deployment guide does, on one machine: ``deploy/make-certs.sh``, the operator's app signing
    key (``deploy/make-app-signing-key.sh``), per-silo key pairs (``deploy/make-supernode-key.sh``),
    ``deploy/connect.sh`` (the operator's connection, to the SuperLink's loopback port),
    ``deploy/register-supernode.sh``, ``deploy/sign-app.sh`` and the start scripts. SuperNodes reach the
    SuperLink through the front only. Each SuperNode has its own FLWR_HOME, ClientAppIo port and process group.
    """

    def __init__(self, tmp: Path, proc: subprocess.Popen, port: int, log: Path) -> None:
        super().__init__(tmp / "coordinator-home", port, proc, log, PROJECT)
        self.tmp = tmp
        self.certs = tmp / "certs"
        self.operator_keys = tmp / "operator-keys"
        self.signatures = tmp / "app-signatures"
        self.front_port = free_port()
        self.front_log = tmp / "fleet-front.log"
        self.front: subprocess.Popen | None = None
        self.supernodes: dict[str, subprocess.Popen] = {}

    def start_front(self) -> None:
        self.front = start_logged(
            [
                str(DEPLOY / "start-fleet-front.sh"),
                str(self.certs),
                str(self.signatures),
                "127.0.0.1",
                str(self.front_port),
                str(self.port),
            ],
            self.front_log,
            self.env,
            cwd=PROJECT,
        )
        wait_for_port(self.front, self.front_port, self.front_log, "fleet front")

    def sign_app(self) -> None:
        deploy_script(
            "sign-app.sh", str(self.operator_keys / OPERATOR_KEY), str(self.signatures), str(PROJECT), env=self.env
        )

    def make_key(self, silo: str) -> Path:
        keys = self.tmp / "silo-keys"
        deploy_script("make-supernode-key.sh", str(keys), silo, env=self.env)
        return keys / silo

    def register(self, private_key: Path) -> int:
        """Register the key; return the node id the SuperLink gave it (what the run's silo-nodes binds)."""
        res = deploy_script("register-supernode.sh", f"{private_key}.pub", "test", env=self.env)
        match = re.search(r"registered SuperNode (\d+) for silo", res.stdout)
        assert match, res.stdout + res.stderr
        return int(match.group(1))

    def start_supernode(self, silo: str, node_config: str, private_key: Path) -> subprocess.Popen:
        home = self.tmp / f"supernode-{silo}"
        home.mkdir(parents=True, exist_ok=True)
        env = {**flower_env(home, PROJECT), "ALIGNFL_BIN": str(BIN), "SUPERNODE_MAX_RETRIES": "3"}
        cmd = [
            str(DEPLOY / "start-supernode.sh"),
            f"127.0.0.1:{self.front_port}",
            str(self.certs / "ca.crt"),
            str(private_key),
            str(self.operator_keys / "trusted-entities.yaml"),
            node_config,
            str(free_port()),
        ]
        proc = start_logged(cmd, home / "supernode.log", env, cwd=PROJECT)
        self.supernodes[silo] = proc
        return proc

    def supernode_log(self, silo: str) -> str:
        return (self.tmp / f"supernode-{silo}" / "supernode.log").read_text()

    def online_nodes(self) -> int:
        res = self.flwr("supernode", "ls", "test", "--format", "json", timeout=60)
        try:
            nodes = json.loads(res.stdout)["nodes"]
        except (json.JSONDecodeError, KeyError):
            return 0
        return sum(1 for n in nodes if n.get("status") == "online")

    def wait_online(self, count: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while self.online_nodes() < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.online_nodes()} of {count} SuperNodes online after {timeout:.0f} s")
            time.sleep(1.0)


@contextmanager
def deployment_federation(tmp: Path) -> Iterator[DeploymentFederation]:
    """Yield a DeploymentFederation; every process it started is stopped on exit, also on failure."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**flower_env(tmp / "coordinator-home", PROJECT), "ALIGNFL_BIN": str(BIN)}
    deploy_script("make-certs.sh", str(tmp / "certs"), env=env)
    deploy_script("make-app-signing-key.sh", str(tmp / "operator-keys"), OPERATOR_KEY, env=env)
    log = tmp / "superlink.log"
    proc = start_logged(
        [str(DEPLOY / "start-superlink.sh"), str(tmp / "certs"), str(tmp / "superlink-state"), str(port)],
        log,
        env,
        cwd=PROJECT,
    )
    fed = DeploymentFederation(tmp, proc, port, log)
    try:
        wait_for_port(proc, port, log, "flower-superlink (TLS, SuperNode auth, loopback)")
        fed.start_front()
        deploy_script("connect.sh", "test", f"127.0.0.1:{port}", str(tmp / "certs" / "ca.crt"), env=env)
        yield fed
    finally:
        for node in fed.supernodes.values():
            stop_process(node)
        if fed.front is not None:
            stop_process(fed.front)
        stop_process(proc)
