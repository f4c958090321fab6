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


class SimulationLink:
    """A running ``flower-superlink --simulation`` and a ``flwr`` connection named ``test`` to it."""

    def __init__(self, home: Path, port: int, proc: subprocess.Popen, log: Path) -> None:
        self.home, self.port, self.proc, self.log = home, port, proc, log
        self.env = flower_env(home)

    def flwr(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=PROJECT, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def run_app(self, run_config: str, num_supernodes: int, cpus_per_client: int = 1,
                timeout: float = 900) -> tuple[dict, str]:
        """``flwr run . test --stream``; returns (this run's `flwr ls` entry, streamed log)."""
        before = {r["run-id"] for r in self.runs()}
        res = self.flwr("run", ".", "test", "--stream", "--run-config", run_config, "--federation-config",
                        f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}",
                        timeout=timeout)
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
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=PROJECT, env=flower_env(home), stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited early:\n{log.read_text()[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"flower-superlink did not open port {port} within 60 s; see {log}")
        yield SimulationLink(home, port, proc, log)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


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
