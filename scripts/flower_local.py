"""Run the app on a private Flower SuperLink (own FLWR_HOME, ports and PID), then stop it.

Used by ``scripts/run`` (the README's run command) and by the end-to-end tests. Plain ``flwr run``
would start a detached SuperLink on fixed ports, reuse whatever SuperLink already listens there
(possibly one without ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION``) and leave it running.

    python scripts/flower_local.py [--num-supernodes 5] [--cpus-per-client 1] [--run-config '...']
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
DEFAULT_SUPERNODES = 5
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = os.environ.copy()
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "ALIGNFL_PROJECT_DIR": str(PROJECT),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    })
    return env


def wait_for_port(proc: subprocess.Popen, port: int, log: Path, what: str, timeout: float = 60) -> None:
    """Block until ``proc`` listens on ``port``; raise with the log's tail if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early (code {proc.returncode}):\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not open port {port} within {timeout:.0f} s; see {log}")


def _descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Flower's SuperExec and app processes start their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_process(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM ``proc``'s process group and every descendant, SIGKILL whatever outlives ``grace`` s."""
    family = _descendants(proc.pid)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in family:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 5
    for pid in [proc.pid, *family]:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.wait(timeout=10)


def start_logged(cmd: list[str], log: Path, env: dict[str, str], cwd: Path = PROJECT) -> subprocess.Popen:
    """Start ``cmd`` in its own session (so it can be stopped as a group), output into ``log``."""
    with open(log, "w") as logf:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)


class SimulationLink:
    """A running SuperLink and a ``flwr`` connection named ``test`` to it."""

    def __init__(self, home: Path, port: int, proc: subprocess.Popen, log: Path) -> None:
        self.home, self.port, self.proc, self.log = home, port, proc, log
        self.env = flower_env(home)

    def flwr(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=PROJECT, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def run_app(self, run_config: str, num_supernodes: int | None, cpus_per_client: int = 1,
                timeout: float = 900) -> tuple[dict, str]:
        """``flwr run . test --stream``; returns (this run's `flwr ls` entry, streamed log).

        ``num_supernodes=None``: a deployment SuperLink, whose SuperNodes are real processes.
        """
        before = {r["run-id"] for r in self.runs()}
        federation = [] if num_supernodes is None else [
            "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"]
        res = self.flwr("run", ".", "test", "--stream", "--run-config", run_config, *federation, timeout=timeout)
        out = res.stdout + res.stderr
        new = [r for r in self.runs() if r["run-id"] not in before]
        assert len(new) == 1, f"expected one new run, got {new}\n{out[-4000:]}"
        return new[0], out

    def runs(self) -> list[dict]:
        res = self.flwr("ls", "test", "--format", "json", timeout=60)
        try:
            return json.loads(res.stdout)["runs"]
        except (json.JSONDecodeError, KeyError):
            return []


@contextmanager
def simulation_superlink(tmp: Path):
    home = tmp / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    port, health = free_port(), free_port()  # Flower 1.42 serves Control, Fleet and Runtime APIs on one HTTP port
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "test"\n\n'
        f'[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    log = tmp / "superlink.log"
    cmd = [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
           "--host", "127.0.0.1", "--port", str(port), "--health-server-address", f"127.0.0.1:{health}",
           "--database", str(tmp / "state.db"), "--disable-runtime-dependency-installation"]
    proc = start_logged(cmd, log, flower_env(home))
    try:
        wait_for_port(proc, port, log, "flower-superlink")
        yield SimulationLink(home, port, proc, log)
    finally:
        stop_process(proc)


DEPLOY = PROJECT / "deploy"


def deploy_script(name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run one of ``deploy/*.sh`` (the scripts the deployment guide tells users to run); raise on failure."""
    res = subprocess.run([str(DEPLOY / name), *args], cwd=PROJECT, env={**env, "ALIGNFL_BIN": str(BIN)},
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"deploy/{name} {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


class DeploymentFederation(SimulationLink):
    """A TLS SuperLink with SuperNode authentication, and real ``flower-supernode`` processes on loopback.

    Everything the deployment guide does, on one machine: ``deploy/make-certs.sh``, per-silo key pairs
    (``deploy/make-supernode-key.sh``), ``deploy/connect.sh``, ``deploy/register-supernode.sh`` and the
    start scripts. Each SuperNode has its own FLWR_HOME, ClientAppIo port and process group.
    """

    def __init__(self, tmp: Path, proc: subprocess.Popen, port: int, log: Path) -> None:
        super().__init__(tmp / "coordinator-home", port, proc, log)
        self.tmp = tmp
        self.certs = tmp / "certs"
        self.supernodes: dict[str, subprocess.Popen] = {}

    def make_key(self, silo: str) -> Path:
        keys = self.tmp / "silo-keys"
        deploy_script("make-supernode-key.sh", str(keys), silo, env=self.env)
        return keys / silo

    def register(self, private_key: Path) -> None:
        deploy_script("register-supernode.sh", f"{private_key}.pub", "test", env=self.env)

    def start_supernode(self, silo: str, node_config: str, private_key: Path) -> subprocess.Popen:
        home = self.tmp / f"supernode-{silo}"
        home.mkdir(parents=True, exist_ok=True)
        env = {**flower_env(home), "ALIGNFL_BIN": str(BIN), "SUPERNODE_MAX_RETRIES": "3"}
        cmd = [str(DEPLOY / "start-supernode.sh"), f"127.0.0.1:{self.port}", str(self.certs / "ca.crt"),
               str(private_key), node_config, str(free_port())]
        proc = start_logged(cmd, home / "supernode.log", env)
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
def deployment_federation(tmp: Path):
    """Yield a DeploymentFederation; every process it started is stopped on exit, also on failure."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**flower_env(tmp / "coordinator-home"), "ALIGNFL_BIN": str(BIN)}
    deploy_script("make-certs.sh", str(tmp / "certs"), env=env)
    log = tmp / "superlink.log"
    proc = start_logged([str(DEPLOY / "start-superlink.sh"), str(tmp / "certs"), str(tmp / "superlink-state"),
                         "127.0.0.1", str(port)], log, env)
    fed = DeploymentFederation(tmp, proc, port, log)
    try:
        wait_for_port(proc, port, log, "flower-superlink (TLS, SuperNode auth)")
        deploy_script("connect.sh", "test", f"127.0.0.1:{port}", str(tmp / "certs" / "ca.crt"), env=env)
        yield fed
    finally:
        for node in fed.supernodes.values():
            stop_process(node)
        stop_process(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-supernodes", type=int, default=DEFAULT_SUPERNODES)
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--run-config", default="", help="flwr --run-config overrides or a TOML file")
    parser.add_argument("--keep", default=str(PROJECT / ".flwr-local"), help="folder for the SuperLink's state and log")
    args = parser.parse_args(argv)
    # turn `kill` into an exception so the SuperLink (its own process group) is always stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(args.keep)
    work.mkdir(parents=True, exist_ok=True)
    run_config = args.run_config or "results-dir='results'"
    with simulation_superlink(work) as link:
        proc = subprocess.Popen([str(BIN / "flwr"), "run", ".", "test", "--stream", "--run-config", run_config,
                                 "--federation-config", f"num-supernodes={args.num_supernodes} "
                                 f"client-resources-num-cpus={args.cpus_per_client}"],
                                cwd=PROJECT, env=link.env)
        proc.wait()
        runs = sorted(link.runs(), key=lambda r: r.get("pending-at", ""))
        status = runs[-1]["status"] if runs else "unknown"
    print(f"[alignfl] run status: {status} (SuperLink log: {link.log})")
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
