"""Load check: an ALIGN-FL simulation with many silos (default 50) on this machine; prints time and peak memory.

    alignfl load-test [--silos 50] [--rounds 1] [--cpus 2] [--max-per-class 500] [--app .]

Silo s holds classes s mod 10 and (s+1) mod 10; with ``silo-layout='slices'`` each class's records
are split into disjoint slices among the silos holding it (10 silos per class for 50 silos), so every
silo has its own small data. Peak memory is the largest sum of RSS over the SuperLink's whole process
tree (SuperExec, ServerApp, Ray, every ClientApp worker), sampled every 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import psutil

from alignfl_app.tools.local_superlink import simulation_superlink


def tree_rss(pid: int) -> tuple[int, int]:
    """(sum, max) of resident memory in bytes over ``pid`` and its descendants."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    sizes = []
    for proc in family:
        try:
            sizes.append(proc.memory_info().rss)
        except psutil.NoSuchProcess:
            continue
    return sum(sizes), max(sizes, default=0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="alignfl load-test", description=__doc__.splitlines()[0])
    ap.add_argument("--silos", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=2, help="Ray CPUs = ClientApps training at once (1 CPU each)")
    ap.add_argument("--max-per-class", type=int, default=500)
    ap.add_argument("--keep", default="", help="folder for results and logs (default: a temporary one)")
    ap.add_argument("--app", default=".", help="the Flower app's folder (the checkout with pyproject.toml)")
    args = ap.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="alignfl-load-")).resolve()
    results = work / "results"
    classes = ";".join(f"{s % 10},{(s + 1) % 10}" for s in range(args.silos))
    run_config = (
        f"results-dir='{results}' run-name='load-{args.silos}' num-server-rounds={args.rounds} "
        f"silo-classes='{classes}' silo-layout='slices' max-per-class={args.max_per_class} "
        f"outlier-silos='0' outliers-per-silo=10 silo-architectures='mlp-small;conv' local-epochs=1 "
        f"synthetic-per-silo=40 server-epochs=1 sample-grid-per-silo=2 round-timeout=3600 server-threads=1"
    )
    peak = {"sum": 0, "max": 0}
    stop = threading.Event()
    with simulation_superlink(work, Path(args.app)) as link:

        def sample() -> None:
            while not stop.is_set():
                total, biggest = tree_rss(link.proc.pid)
                peak["sum"], peak["max"] = max(peak["sum"], total), max(peak["max"], biggest)
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        run, log = link.run_app(run_config, num_supernodes=args.silos, cpus_per_client=1, timeout=7200)
        seconds = time.perf_counter() - t0
        stop.set()
        sampler.join()
    (work / "flwr-run.log").write_text(log)
    summary_path = results / f"load-{args.silos}" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    last = (summary.get("rounds") or [{}])[-1]
    print(f"silos: {args.silos}  rounds: {args.rounds}  run status: {run['status']}")
    print(f"wall time (flwr run, incl. Ray start): {seconds:.0f} s")
    print(
        f"peak memory, whole process tree: {peak['sum'] / 2**30:.2f} GiB; "
        f"largest process: {peak['max'] / 2**30:.2f} GiB"
    )
    print(
        f"generators used in the last round: {len(last.get('generators-used', []))}; "
        f"accepted replies: {last.get('accepted-replies')}; rejected: {len(last.get('rejected-replies', []))}"
    )
    print(f"final global accuracy (real MNIST test set): {summary.get('final-global-accuracy')}")
    print(f"records per silo (silo-0, incl. outliers): {last.get('silos', {}).get('silo-0', {}).get('num-examples')}")
    print(f"results: {summary_path.parent}  logs: {work}")
    return 0 if run["status"] == "finished:completed" else 1
