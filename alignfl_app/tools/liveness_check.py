"""A dead silo costs seconds, and a killed federation resumes where it was: measured on real Flower processes.

    alignfl liveness-check [--silos 5] [--rounds 4] [--kill-round 2] [--run-config '...'] [--out results/liveness]

Two deployment-mode federations on loopback (a local SuperLink and one ``flower-supernode`` process per silo,
no Ray; see ``gpu_check.LocalDeployment``), a small fast configuration; a round costs mostly Flower's process
start-ups (one ClientApp process per message), so the clean run and the resumed run are one:

1. clean, killed and resumed: every silo answers every round; the whole federation (SuperLink, SuperNodes,
   ServerApp) is SIGKILLed once round ``--kill-round`` is in summary.json and restarted with ``resume=true``,
   the same run-name and silo-dirs. Round wall times from ``elapsed-seconds`` in summary.json (round 1 also pays
   the start-up: the clean median is of rounds 2..). Passes when each silo's train-loss of the round after the
   resume stays at its pre-kill level (below its round-1 loss);
2. node killed: the same run, one SuperNode (and its ClientApp processes) SIGKILLed as round ``--kill-round``
   starts (round ``kill-round - 1`` is in summary.json); passes when every round from then on took at most
   ``--bound`` (2) x the clean median round time.

Prints and writes ``liveness.json``; exits 1 if a run fails or a check does not pass.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from flwr.common.config import parse_config_args

from alignfl_app.tools.gpu_check import LocalDeployment, local_deployment
from alignfl_app.tools.local_superlink import flower_command

FAST = (
    "max-per-class=200 outliers-per-silo=0 outlier-dataset='none' local-epochs=1 batch-size=64 "
    "synthetic-per-silo=100 server-epochs=1 audit=false sample-grid-per-silo=0 client-threads=1 "
    "server-threads=1 round-timeout=600"
)


def merge_config(*parts: str) -> str:
    """One ``k=v ...`` string from several, later keys winning (``flwr run`` refuses a key given twice)."""
    merged: dict = {}
    for part in parts:
        if part.strip():
            merged.update(parse_config_args([part]))

    def value(v) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else f"'{v}'" if isinstance(v, str) else repr(v)

    return " ".join(f"{k}={value(v)}" for k, v in merged.items())


def run_config(args, results: Path, name: str, extra: str = "") -> str:
    classes = ";".join(f"{2 * i % 10},{(2 * i + 1) % 10}" for i in range(args.silos))
    return merge_config(
        FAST,
        f"num-server-rounds={args.rounds} min-silos={args.min_silos} results-dir='{results}' "
        f"run-name='{name}' silo-classes='{classes}'",
        "silo-layout='slices'" if args.silos > 5 else "",
        args.run_config,
        extra,
    )


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant (found before the kill: orphans are not found after it)."""
    try:
        proc = psutil.Process(pid)
        family = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=10)


def read_summary(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet (it is replaced atomically)
        return {}


def completed_rounds(summary: dict) -> list[int]:
    return [r["round"] for r in summary.get("rounds", []) if r.get("elapsed-seconds") is not None]


def round_times(summary: dict, after_round: int = 0) -> dict[int, float]:
    """Each round's wall time: the server's clock at its end minus at the previous round's end. A resumed run
    (``after_round``: its checkpoint's round) restarts the clock: its first round is measured from the ServerApp's
    start, the rounds carried over from before are left out."""
    before = 0.0 if after_round else summary.get("initial-eval-elapsed-seconds", 0.0)
    times = {}
    for r in sorted(summary.get("rounds", []), key=lambda r: r["round"]):
        if r.get("elapsed-seconds") is None or r["round"] <= after_round:
            continue
        times[r["round"]] = r["elapsed-seconds"] - before
        before = r["elapsed-seconds"]
    return times


def start_silos(link: LocalDeployment, silos_dir: Path, n: int) -> None:
    for i in range(n):
        link.start_supernode(f"silo-{i}", f"partition-id={i} silo-name='silo-{i}' silo-dir='{silos_dir / f'silo-{i}'}'")


def run_watched(
    link: LocalDeployment, config: str, summary: Path, timeout: float, on_round: Callable[[int], bool] | None = None
) -> tuple[str, subprocess.Popen]:
    """``flwr run --stream`` in the background; ``on_round(completed)`` after each new completed round (True: stop
    watching, e.g. after killing the federation). Returns (the run's status, the flwr process)."""
    log = open(link.tmp / "flwr-run.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [flower_command("flwr"), "run", str(link.app), "test", "--stream", "--run-config", config],
        cwd=link.app,
        env=link.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    seen, deadline = 0, time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            done = completed_rounds(read_summary(summary))
            if done and max(done) > seen:
                seen = max(done)
                if on_round and on_round(seen):
                    return "killed", proc
            time.sleep(0.2)
        if proc.poll() is None:
            kill_tree(proc.pid)
            return "timeout", proc
        runs = sorted(link.runs(), key=lambda r: r.get("pending-at", ""))
        status = runs[-1]["status"] if runs else "unknown"
        if status != "finished:completed":
            print(
                f"[alignfl] run {status}; the end of its log:\n{(link.tmp / 'flwr-run.log').read_text()[-3000:]}",
                file=sys.stderr,
                flush=True,
            )
        return status, proc
    finally:
        log.close()


def node_killed_run(app: Path, work: Path, args) -> dict:
    name = "node-killed"
    killed: dict[str, float] = {}
    with local_deployment(work / name / "flower", app) as link:
        start_silos(link, work / name / "silos", args.silos)

        def kill_one(completed: int) -> bool:
            if completed == args.kill_round - 1 and not killed:  # the next round is starting
                kill_tree(link.nodes[-1].pid)
                killed["after-round"] = completed
                print(
                    f"[alignfl] SIGKILLed silo-{args.silos - 1}'s SuperNode as round {completed + 1} starts", flush=True
                )
            return False

        status, _ = run_watched(
            link, run_config(args, work, name), work / name / "summary.json", args.timeout, kill_one
        )
    summary = read_summary(work / name / "summary.json")
    return {
        "status": status,
        "round-seconds": round_times(summary),
        "killed-after-round": killed.get("after-round"),
        "missing-replies": {r["round"]: r.get("missing-replies", []) for r in summary.get("rounds", [])},
    }


def kill_and_resume_run(app: Path, work: Path, args) -> dict:
    name = "resumed"
    silos, summary_path = work / name / "silos", work / name / "summary.json"
    config = run_config(args, work, name)
    with local_deployment(work / name / "flower-1", app) as link:
        start_silos(link, silos, args.silos)

        def kill_all(completed: int) -> bool:
            if completed < args.kill_round:
                return False
            for node in link.nodes:
                kill_tree(node.pid)
            kill_tree(link.proc.pid)  # the SuperLink, its SuperExec and the ServerApp
            print(f"[alignfl] SIGKILLed the whole federation after round {completed}", flush=True)
            return True

        status, flwr = run_watched(link, config, summary_path, args.timeout, kill_all)
        kill_tree(flwr.pid)
    before = read_summary(summary_path)
    if status != "killed":
        return {"status": f"not killed: {status}"}
    with local_deployment(work / name / "flower-2", app) as link:
        start_silos(link, silos, args.silos)
        status, _ = run_watched(link, merge_config(config, "resume=true"), summary_path, args.timeout)
    after = read_summary(summary_path)
    resumed_after = max(completed_rounds(before), default=0)
    times = {**round_times(before), **round_times(after, resumed_after)}  # each part against its own clock
    losses = {}
    for r in after.get("rounds", []):
        for silo, m in r.get("silos", {}).items():
            if "train-loss" in m:
                losses.setdefault(silo, {})[r["round"]] = m["train-loss"]
    return {
        "status": status,
        "round-seconds": times,
        "killed-after-round": resumed_after,
        "resumed-after-rounds": after.get("resumed-after-rounds"),
        "train-loss": losses,
    }


def verdict(clean: dict, killed: dict, resumed: dict, args) -> dict:
    out: dict = {}
    times = clean.get("round-seconds", {})
    # round 1 and the resumed run's first round also pay the ServerApp's start-up
    restarted = clean.get("killed-after-round", 0) + 1
    steady = [t for r, t in times.items() if r > 1 and r != restarted] or list(times.values())
    if steady:
        median = statistics.median(steady)
        after = {r: t for r, t in killed.get("round-seconds", {}).items() if r >= args.kill_round}
        out["clean-median-round-seconds"] = median
        out["rounds-after-kill-seconds"] = after
        out["rounds-after-kill-within-bound"] = bool(after) and all(t <= args.bound * median for t in after.values())
        out["bound"] = f"{args.bound:g} x clean median = {args.bound * median:.1f} s"
    k = args.kill_round
    loss = resumed.get("train-loss", {})
    rows = {s: (v.get(1), v.get(k), v.get(k + 1)) for s, v in loss.items()}
    out["resume-train-loss (round 1, kill round, next round)"] = rows
    out["resume-continues"] = bool(rows) and all(
        None not in row and row[2] < row[0] and row[2] <= 1.1 * row[1] for row in rows.values()
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="alignfl liveness-check", description=__doc__.splitlines()[0])
    ap.add_argument("--app", default=".", help="the Flower app's folder (the checkout with pyproject.toml)")
    ap.add_argument("--silos", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument(
        "--kill-round", type=int, default=2, help="the round a SuperNode dies in; the federation is killed after it"
    )
    ap.add_argument("--min-silos", type=int, default=3, help="replies after which the rest get a grace period")
    ap.add_argument("--bound", type=float, default=2.0, help="rounds after the kill: at most this x clean median")
    ap.add_argument("--skip-node-kill", action="store_true", help="only the clean run, killed and resumed")
    ap.add_argument("--run-config", default="", help="extra run-config overrides ('k=v ...')")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run")
    ap.add_argument("--out", default="results/liveness")
    args = ap.parse_args(argv)
    if not 2 <= args.kill_round < args.rounds:
        print(f"error: --kill-round must be in 2..{args.rounds - 1} (rounds after it are measured)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": {"cpu-cores": os.cpu_count(), "load-average": os.getloadavg()}, "args": vars(args)}
    started = time.perf_counter()
    killed: dict = {}
    with tempfile.TemporaryDirectory(prefix="alignfl-liveness-") as tmp:
        work, app = Path(tmp), Path(args.app).resolve()
        # the clean run: no silo is missing in any of its rounds (round k+1 starts after the resume, like a
        # round 1 with connected SuperNodes); its rounds 2.. give the clean median
        resumed = report["clean-kill-and-resume"] = kill_and_resume_run(app, work, args)
        print(f"[alignfl] clean, killed after round {args.kill_round} and resumed: {json.dumps(resumed)}", flush=True)
        if not args.skip_node_kill:
            killed = report["node-killed"] = node_killed_run(app, work, args)
            print(f"[alignfl] node killed: {json.dumps(killed)}", flush=True)
    report["verdict"] = verdict(resumed, killed, resumed, args)
    report["wall-seconds"] = time.perf_counter() - started
    (out / "liveness.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["verdict"], indent=1))
    print(f"[alignfl] figures in {out / 'liveness.json'} ({report['wall-seconds']:.0f} s)")
    ok = all(r.get("status") == "finished:completed" for r in (killed, resumed) if r)
    ok &= report["verdict"]["resume-continues"]
    if not args.skip_node_kill:
        ok &= report["verdict"].get("rounds-after-kill-within-bound", False)
    return 0 if ok else 1
