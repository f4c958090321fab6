"""Run the app on a private Flower SuperLink (own FLWR_HOME, ports and PID), then stop it.

Used by ``alignfl run`` (the README's run command), the other tools that start runs, and the end-to-end
tests. Plain ``flwr run`` would start a detached SuperLink on fixed ports, reuse whatever SuperLink
already listens there (possibly one without ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION``) and
leave it running.

    alignfl run [--app .] [--num-supernodes N] [--cpus-per-client 1] [--gpus-per-client 0] [--run-config '...']
                [--silos DIR] [--keep .flwr-local]

Every launch simulates a fresh federation: its silos live in ``<app>/silos/<run-name or timestamp>/silo-<k>/``
(their policies, ledgers, reports, state), set up from the run config (``silo_setup.provision_simulated_silos``).
``--silos DIR`` or ``$ALIGNFL_SILOS_ROOT`` keeps a federation's silos across launches; ``resume=true`` continues
the silos of its run-name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from flwr.common.config import parse_config_args

from alignfl_app.config import ConfigError, RunConfig, parse_run_config
from alignfl_app.data.datasets import ensure_datasets
from alignfl_app.data.errors import DataMissingError
from alignfl_app.silo.setup import provision_simulated_silos

BIN = Path(sys.executable).parent


def flower_command(name: str) -> str:
    """Flower's executable ``name``: beside this Python (a venv), else on PATH (packages installed elsewhere)."""
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name) or str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_silos(project_dir: Path, name: str = "") -> Path:
    """A new simulated federation's silos folder: ``<project>/silos/<name or a timestamp>``."""
    return Path(project_dir).resolve() / "silos" / (name or f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")


def flower_env(flwr_home: Path, project_dir: Path, silos: Path | None = None) -> dict[str, str]:
    """The environment of a Flower process: own FLWR_HOME, no runtime installs, results under ``project_dir``,
    simulated silos' own folders under ``silos``, else $ALIGNFL_SILOS_ROOT, else a fresh ``project_dir/silos/...``."""
    env = os.environ.copy()
    root = silos or env.get("ALIGNFL_SILOS_ROOT") or fresh_silos(project_dir)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "ALIGNFL_PROJECT_DIR": str(project_dir),
            "ALIGNFL_SILOS_ROOT": str(Path(root).resolve()),
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        }
    )
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


def stop_process(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM ``proc``'s process group and every descendant, SIGKILL whatever outlives ``grace`` s.

    Descendants are found by parentage, not by group: Flower's SuperExec and app processes start their own sessions.
    """
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
    _, alive = psutil.wait_procs(family, timeout=5)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait(timeout=10)


def start_logged(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own session (so it can be stopped as a group), output into ``log``."""
    with open(log, "w") as logf:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)


class SimulationLink:
    """A running SuperLink and a ``flwr`` connection named ``test`` to it; ``app`` is the Flower app's folder."""

    def __init__(
        self, home: Path, port: int, proc: subprocess.Popen, log: Path, app: Path, env: dict[str, str] | None = None
    ) -> None:
        self.home, self.port, self.proc, self.log, self.app = home, port, proc, log, app
        self.env = env or flower_env(home, app)

    @property
    def silos(self) -> Path:
        """Where this SuperLink's simulated silos keep their folders."""
        return Path(self.env["ALIGNFL_SILOS_ROOT"])

    def provision(self, run_config: str) -> None:
        """Set up the simulated silos a run config describes (names, data folders) before it runs."""
        cfg = launch_config(run_config)
        if cfg is not None:
            provision_simulated_silos(self.silos, cfg, self.app)

    def flwr(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(
            [flower_command("flwr"), *args], cwd=self.app, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def run_app(
        self, run_config: str, num_supernodes: int | None, cpus_per_client: int = 1, timeout: float = 900
    ) -> tuple[dict, str]:
        """``flwr run <app> test --stream``; returns (this run's `flwr ls` entry, streamed log).

        ``num_supernodes=None``: a deployment SuperLink, whose SuperNodes are real processes.
        """
        before = {r["run-id"] for r in self.runs()}
        if num_supernodes is not None:
            self.provision(run_config)
        federation = (
            []
            if num_supernodes is None
            else ["--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"]
        )
        res = self.flwr(
            "run", str(self.app), "test", "--stream", "--run-config", run_config, *federation, timeout=timeout
        )
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
def simulation_superlink(tmp: Path, app: Path, silos: Path | None = None) -> Iterator[SimulationLink]:
    """A simulation SuperLink (state and log under ``tmp``) for runs of the app in ``app``, its silos under
    ``silos`` (default: see ``flower_env``); stopped on exit."""
    app = app.resolve()
    home = tmp / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    port, health = free_port(), free_port()  # Flower 1.42 serves Control, Fleet and Runtime APIs on one HTTP port
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    log = tmp / "superlink.log"
    cmd = [
        flower_command("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--health-server-address",
        f"127.0.0.1:{health}",
        "--database",
        str(tmp / "state.db"),
        "--disable-runtime-dependency-installation",
    ]
    env = flower_env(home, app, silos)
    proc = start_logged(cmd, log, env, cwd=app)
    try:
        wait_for_port(proc, port, log, "flower-superlink")
        yield SimulationLink(home, port, proc, log, app, env)
    finally:
        stop_process(proc)


def run_config_overrides(run_config: str) -> dict | None:
    """A run config (``k=v ...`` or a TOML file) as ``flwr run --run-config`` reads it; None when unreadable (the
    run itself then reports the problem)."""
    try:
        return parse_config_args([run_config]) if run_config else {}
    except Exception:  # flwr raises several kinds
        return None


def launch_config(run_config: str) -> RunConfig | None:
    """The full run config a launch asks for (the defaults with its overrides), or None when it is invalid (the
    ServerApp then refuses it with its one-line reason)."""
    overrides = run_config_overrides(run_config)
    try:
        return None if overrides is None else parse_run_config({**RunConfig().flat(), **overrides})
    except ConfigError:
        return None


def configured_silos(run_config: str) -> int:
    """How many silos a run config defines; an invalid one is sized by the defaults and then refused by the
    ServerApp with its one-line reason."""
    cfg = launch_config(run_config)
    if cfg is not None:
        return cfg.data.num_silos
    # still one SuperNode per ';' group of silo-classes (class ids or folder class names)
    groups = str((run_config_overrides(run_config) or {}).get("silo-classes", "")).strip()
    return len(groups.split(";")) if groups else RunConfig().data.num_silos


def launch_silos(app: Path, run_config: str, chosen: str = "") -> Path:
    """The simulated silos of this launch: ``chosen`` (``--silos``) or $ALIGNFL_SILOS_ROOT, kept across launches;
    else fresh ones under ``<app>/silos/``: named after the run-name (a resumed run continues its own, which must
    exist; a new run must not reuse another's), else after the time. ConfigError names the fix."""
    kept = chosen or os.environ.get("ALIGNFL_SILOS_ROOT", "")
    if kept:
        return Path(kept).expanduser().resolve()
    cfg = launch_config(run_config)
    run = cfg.run if cfg is not None else RunConfig().run
    folder = fresh_silos(app, run.run_name)
    if run.resume and not folder.is_dir():
        raise ConfigError(
            f"resume=true: run '{run.run_name}' has no simulated silos in {folder}: pass the folder its "
            "silos used (alignfl run --silos DIR)"
        )
    if not run.resume and run.run_name and folder.is_dir() and any(folder.iterdir()):
        raise ConfigError(
            f"{folder} holds the simulated silos of an earlier run named '{run.run_name}': set "
            "resume=true to continue it, choose another run-name, or delete that folder to start afresh"
        )
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignfl run", description=__doc__.splitlines()[0])
    parser.add_argument("--app", default=".", help="the Flower app's folder (the checkout with pyproject.toml)")
    parser.add_argument(
        "--num-supernodes",
        type=int,
        default=None,
        help="simulated SuperNodes (default: one per silo of the run config's silo-classes)",
    )
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument(
        "--gpus-per-client",
        type=float,
        default=0.0,
        help="GPU share Ray reserves per simulated silo (e.g. 0.2: five silos on one GPU); "
        "with 0 every silo may still use a visible GPU (client-device='auto')",
    )
    parser.add_argument("--run-config", default="", help="flwr --run-config overrides or a TOML file")
    parser.add_argument(
        "--silos",
        default="",
        help="keep the simulated silos in DIR across launches (default: "
        "$ALIGNFL_SILOS_ROOT, else fresh ones in <app>/silos/<run-name or timestamp>)",
    )
    parser.add_argument("--keep", default=".flwr-local", help="folder for the SuperLink's state and log")
    args = parser.parse_args(argv)
    # turn `kill` into an exception so the SuperLink (its own process group) is always stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(args.keep).resolve()
    work.mkdir(parents=True, exist_ok=True)
    run_config = args.run_config or "results-dir='results'"
    num_supernodes = args.num_supernodes or configured_silos(run_config)
    try:
        silos = launch_silos(Path(args.app), run_config, args.silos)
        cfg = launch_config(run_config)
        if cfg is not None:  # the machine's own datasets: what this simulation's silos and server will read
            ensure_datasets(cfg)
    except (ConfigError, DataMissingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with simulation_superlink(work, Path(args.app), silos) as link:
        try:
            link.provision(run_config)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"[alignfl] simulated silos: {link.silos}", flush=True)
        proc = subprocess.Popen(
            [
                flower_command("flwr"),
                "run",
                str(link.app),
                "test",
                "--stream",
                "--run-config",
                run_config,
                "--federation-config",
                f"num-supernodes={num_supernodes} "
                f"client-resources-num-cpus={args.cpus_per_client} "
                f"client-resources-num-gpus={args.gpus_per_client}",
            ],
            cwd=link.app,
            env=link.env,
        )
        proc.wait()
        runs = sorted(link.runs(), key=lambda r: r.get("pending-at", ""))
        status = runs[-1]["status"] if runs else "unknown"
    print(f"[alignfl] run status: {status} (SuperLink log: {link.log})")
    return 0 if status == "finished:completed" else 1
