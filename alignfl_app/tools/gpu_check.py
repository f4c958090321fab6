"""A short federation on CUDA beside the same federation on the CPU: client and server samples per second.

    alignfl gpu-check [--silos 5] [--rounds 2] [--modes plain dp] [--devices cuda cpu] [--run-config '...']
                      [--out results/gpu-check]

Each (mode, device) pair is one real federation in deployment mode: a local SuperLink and one flower-supernode
process per silo on loopback (no Ray, so it runs wherever flwr and torch are installed). ``plain`` is the
default federation without DP; ``dp`` trains every silo under DP-SGD with large Poisson batches, the case a GPU
is for. Client samples/s: records a silo's training went through per second of it, from the run's summary
(plain) or, under DP, from the silos' own reports (those figures never leave a silo; this tool owns the silos'
folders). Server samples/s: synthetic samples drawn and trained on per second of the server's learning.
The last round is reported (the first one also pays for CUDA's start-up). Exits 1 if a run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alignfl_app.tools.local_superlink import (
    SimulationLink,
    flower_command,
    flower_env,
    free_port,
    start_logged,
    stop_process,
    wait_for_port,
)

MODES = {
    "plain": "local-epochs=2 server-epochs=2",
    "dp": (
        "generator-layout='per-class' silo-architectures='mlp-dp' dp-epsilon=4.0 dp-steps=40 "
        "dp-sample-rate=0.25 dp-learning-rate=0.002 server-epochs=2"
    ),
}
COMMON = "audit=false sample-grid-per-silo=0 outlier-dataset='none' round-timeout=1200"


class LocalDeployment(SimulationLink):
    """An insecure SuperLink on loopback and real SuperNodes beside it (one process each, own FLWR_HOME)."""

    def __init__(self, tmp: Path, proc, port: int, log: Path, app: Path) -> None:
        super().__init__(tmp / "superlink-home", port, proc, log, app)
        self.tmp = tmp
        self.nodes: list = []

    def start_supernode(self, name: str, node_config: str) -> None:
        home = self.tmp / name
        home.mkdir(parents=True, exist_ok=True)
        cmd = [
            flower_command("flower-supernode"),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--node-config",
            node_config,
            "--port",
            str(free_port()),
            "--max-retries",
            "5",
        ]
        self.nodes.append(start_logged(cmd, home / "supernode.log", flower_env(home, self.app), cwd=self.app))


@contextmanager
def local_deployment(tmp: Path, app: Path) -> Iterator[LocalDeployment]:
    app = app.resolve()
    home = tmp / "superlink-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    log = tmp / "superlink.log"
    cmd = [
        flower_command("flower-superlink"),
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(tmp / "state.db"),
        "--disable-runtime-dependency-installation",
    ]
    proc = start_logged(cmd, log, flower_env(home, app), cwd=app)
    link = LocalDeployment(tmp, proc, port, log, app)
    try:
        wait_for_port(proc, port, log, "flower-superlink")
        yield link
    finally:
        for node in link.nodes:
            stop_process(node)
        stop_process(proc)


def run_federation(app: Path, work: Path, mode: str, device: str, args) -> dict:
    """One federation; returns its figures (or the failure and the log's tail)."""
    threads = 1 if device == "cuda" else max(1, (os.cpu_count() or 1) // args.silos)
    name = f"{mode}-{device}-{time.strftime('%H%M%S')}"
    silos = work / name / "silos"
    run_config = " ".join(
        [
            MODES[mode],
            COMMON,
            args.run_config,
            f"num-server-rounds={args.rounds}",
            f"client-device='{device}'",
            f"server-device='{device}'",
            f"client-threads={threads}",
            f"server-threads={os.cpu_count() or 1}",
            f"results-dir='{work}'",
            f"run-name='{name}'",
            f"silo-classes='{';'.join(f'{2 * i % 10},{(2 * i + 1) % 10}' for i in range(args.silos))}'",
            "silo-layout='slices'" if args.silos > 5 else "",
        ]
    )
    started = time.perf_counter()
    with local_deployment(work / name / "flower", app) as link:
        for i in range(args.silos):
            link.start_supernode(f"silo-{i}", f"partition-id={i} silo-name='silo-{i}' silo-dir='{silos / f'silo-{i}'}'")
        entry, out = link.run_app(run_config, num_supernodes=None, timeout=args.timeout)
    wall = time.perf_counter() - started
    if entry.get("status") != "finished:completed":
        return {"mode": mode, "device": device, "status": entry.get("status"), "log": out[-3000:]}
    summary = json.loads((work / name / "summary.json").read_text())
    last = summary["rounds"][-1]
    if mode == "dp":  # private figures: each silo's own report
        reports = [json.loads(p.read_text()) for p in sorted(silos.glob(f"*/reports/round-{last['round']:03d}.json"))]
    else:
        reports = list(last.get("silos", {}).values())
    client = [r["samples-per-second"] for r in reports if "samples-per-second" in r]
    server = last.get("server", {})
    return {
        "mode": mode,
        "device": device,
        "status": entry["status"],
        "wall-seconds": wall,
        "silos-reporting": len(client),
        "client-samples-per-second-median": statistics.median(client) if client else None,
        "client-samples-per-second-total": sum(client) if client else None,
        "server-samples-per-second": server.get("synthetic-samples", 0) / max(server.get("server-seconds", 0), 1e-9),
        "final-accuracy": summary.get("final-global-accuracy"),
        "run-config": run_config,
    }


def describe_devices() -> dict[str, str]:
    import torch

    info = {"torch": torch.__version__, "cpu-cores": str(os.cpu_count())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="alignfl gpu-check", description=__doc__.splitlines()[0])
    ap.add_argument("--app", default=".", help="the Flower app's folder (the checkout with pyproject.toml)")
    ap.add_argument("--silos", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["plain", "dp"], choices=sorted(MODES))
    ap.add_argument("--devices", nargs="+", default=["cuda", "cpu"], choices=["cuda", "cpu"])
    ap.add_argument("--run-config", default="", help="extra run-config overrides ('k=v ...')")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", default="results/gpu-check")
    args = ap.parse_args(argv)
    info = describe_devices()
    if "cuda" in args.devices and "gpu" not in info:
        print(
            "error: torch sees no CUDA GPU on this machine: run gpu-check where one is, or pass --devices cpu",
            file=sys.stderr,
        )
        return 1
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="alignfl-gpu-check-") as tmp:
        for mode in args.modes:
            for device in args.devices:
                row = run_federation(Path(args.app), Path(tmp), mode, device, args)
                rows.append(row)
                (out / "gpu-check.json").write_text(json.dumps({"machine": info, "runs": rows}, indent=1))
                print(f"[alignfl] {mode} on {device}: {json.dumps(row)}", flush=True)
    print(f"machine: {info}")
    print(
        f"{'mode':>6} {'device':>6} | {'client samples/s (median silo)':>30} {'server samples/s':>17} "
        f"{'wall s':>7} {'accuracy':>9}"
    )
    for r in rows:
        if r["status"] != "finished:completed":
            print(f"{r['mode']:>6} {r['device']:>6} | run {r['status']}:\n{r.get('log', '')}")
            continue
        print(
            f"{r['mode']:>6} {r['device']:>6} | {r['client-samples-per-second-median'] or 0:>30.0f} "
            f"{r['server-samples-per-second']:>17.0f} {r['wall-seconds']:>7.1f} {r['final-accuracy'] or 0:>9.4f}"
        )
    print(f"[alignfl] figures in {out / 'gpu-check.json'}")
    return 0 if all(r["status"] == "finished:completed" for r in rows) else 1
