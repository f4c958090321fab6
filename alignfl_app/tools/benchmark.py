"""Cost of each method: time, throughput, bytes on the wire and peak memory; plus a silo-count scaling run.

Every figure is read from the run folders the methods write themselves (summary.json, measured inside
the ServerApp / ClientApp processes), so a comparison run can be benchmarked without rerunning it.

    alignfl benchmark --from results/compare-mnist-fast            # tabulate an existing comparison
    alignfl benchmark --experiment mnist-fast [--methods ...]      # run the methods, then tabulate
    alignfl benchmark --scaling 5 10 20 50 [--scaling-methods alignfl fedavg]  # server cost vs silos

Writes <out>/benchmark.json and <out>/benchmark.md (default out: results/benchmark). Runs use the Flower
app in ``--app`` (default: the current folder).
Peak memory is the process's own ru_maxrss (a Ray worker process may host several silos in turn).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from alignfl_app.config import ConfigError
from alignfl_app.experiments import add_overrides_option, parse_assignments
from alignfl_app.tools.compare import FEDERATED, METHODS, run_methods
from alignfl_app.tools.progress import progress

SCALING_EXPERIMENT = "mnist-fast"
TARGET_ACCURACY = {"mnist": 0.95, "fashion-mnist": 0.80}  # time-to-accuracy targets; other datasets: --target


def _silo_values(summary: dict, *keys: str) -> list[float]:
    """Every silo-round value of the first of ``keys`` present (ALIGN-FL prefixes some metrics with train-)."""
    out = []
    for r in summary["rounds"]:
        for m in r.get("silos", {}).values():
            for k in keys:
                if isinstance(m.get(k), (int, float)):
                    out.append(float(m[k]))
                    break
    return out


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def time_to_accuracy(summary: dict, target: float | None) -> dict[str, Any]:
    """Seconds from the ServerApp's start until the global model first reached ``target`` on the real test data
    (None: never), and until it first reached its own best accuracy, from the rounds' evaluation times."""
    judged = [
        (r["global"]["accuracy"], r["elapsed-seconds"])
        for r in summary["rounds"]
        if isinstance(r.get("global", {}).get("accuracy"), (int, float)) and "elapsed-seconds" in r
    ]
    best = max((a for a, _ in judged), default=None)
    return {
        "target-accuracy": target,
        "seconds-to-target": next((t for a, t in judged if target is not None and a >= target), None),
        "best-accuracy": best,
        "seconds-to-best": next((t for a, t in judged if a == best), None),
    }


def costs(summary: dict, target: float | None = None) -> dict[str, Any]:
    """The cost figures of one run, from its summary.json (``target``: the accuracy timed to; default by dataset)."""
    if target is None:
        target = TARGET_ACCURACY.get(summary["config"].get("dataset", ""))
    method = summary["method"]
    rounds = [r for r in summary["rounds"] if "elapsed-seconds" in r]
    walls, prev = [], summary.get("initial-eval-elapsed-seconds")
    for r in rounds:
        if prev is not None:
            walls.append(r["elapsed-seconds"] - prev)
        prev = r["elapsed-seconds"]
    server = [r.get("server", {}) for r in summary["rounds"]]
    down = [
        m.get("bytes-down-train", 0) + m.get("bytes-down-eval", 0)
        for r in summary["rounds"]
        for m in r.get("silos", {}).values()
        if "bytes-up" in m
    ]
    return {
        "method": method,
        "silos": len(summary["config"]["silo-classes"].split(";")),
        "rounds": len(summary["rounds"]),
        "total-wall-seconds": summary.get("flwr-wall-seconds", summary.get("elapsed-seconds")),
        "wall-seconds-per-round": _mean(walls),
        "client-train-seconds-per-round": _mean(_silo_values(summary, "train-seconds")),
        "client-samples-per-second": _mean(
            _silo_values(summary, "samples-per-second")
            or [s["samples-per-second"] for s in server if "samples-per-second" in s]
        ),
        "server-seconds-per-round": _mean([s["server-seconds"] for s in server if "server-seconds" in s]),
        "synthetic-samples-per-round": _mean([s["synthetic-samples"] for s in server if "synthetic-samples" in s]),
        "bytes-up-per-silo-round": _mean(_silo_values(summary, "bytes-up")),
        "bytes-down-per-silo-round": _mean([float(d) for d in down]),
        "full-vae-bytes": _mean(_silo_values(summary, "train-vae-bytes", "vae-bytes")),
        "server-peak-rss-mb": max([s.get("server-peak-rss-mb", s.get("peak-rss-mb", 0.0)) for s in server] or [0.0])
        or None,
        "client-peak-rss-mb": max(_silo_values(summary, "train-peak-rss-mb", "peak-rss-mb"), default=None),
        "final-global-accuracy": summary.get("final-global-accuracy"),
        **time_to_accuracy(summary, target),
    }


def from_folder(folder: Path, target: float | None = None) -> list[dict[str, Any]]:
    runs = folder / "runs"
    return [
        costs(json.loads((runs / m / "summary.json").read_text()), target)
        for m in METHODS
        if (runs / m / "summary.json").is_file()
    ]


def scaling_overrides(num_silos: int) -> dict[str, Any]:
    """``num_silos`` silos over MNIST's 10 classes: silo k holds pair k mod 5, shared pairs are sliced."""
    pairs = ";".join(f"{2 * (k % 5)},{2 * (k % 5) + 1}" for k in range(num_silos))
    return {
        "silo-classes": pairs,
        "silo-layout": "slices",
        "max-per-class": 200,
        "outliers-per-silo": 60,
        "local-epochs": 1,
        "num-server-rounds": 2,
        "synthetic-per-silo": 200,
        "server-epochs": 2,
        "reference-epochs": 1,
        "sample-grid-per-silo": 0,
    }


MB = 2**20


def _f(v: Any, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if v is None else f"{v / scale:.{digits}f}"


def markdown(rows: list[dict], scaling: list[dict]) -> str:
    out = []
    if rows:
        out += [
            "## Cost per method",
            "",
            "| method | silos | wall s / round | client train s / round | client samples/s | "
            "server s / round | up MiB / silo / round | down MiB / silo / round | full VAE MiB | "
            "server peak RSS MiB | client peak RSS MiB | final accuracy |",
            "|" + "---|" * 12,
        ]
        for r in rows:
            out.append(
                f"| {r['method']} | {r['silos']} | {_f(r['wall-seconds-per-round'])} | "
                f"{_f(r['client-train-seconds-per-round'], digits=2)} | "
                f"{_f(r['client-samples-per-second'], digits=0)} | "
                f"{_f(r['server-seconds-per-round'], digits=2)} | {_f(r['bytes-up-per-silo-round'], MB, 3)} | "
                f"{_f(r['bytes-down-per-silo-round'], MB, 3)} | {_f(r['full-vae-bytes'], MB, 3)} | "
                f"{_f(r['server-peak-rss-mb'], digits=0)} | {_f(r['client-peak-rss-mb'], digits=0)} | "
                f"{_f(r['final-global-accuracy'], digits=4)} |"
            )
        out += [
            "",
            "## Time to accuracy (seconds from the ServerApp's start, at the evaluation of a round)",
            "",
            "| method | target | s to target | best accuracy | s to best |",
            "|" + "---|" * 5,
        ]
        for r in rows:
            out.append(
                f"| {r['method']} | {_f(r['target-accuracy'], digits=2)} | {_f(r['seconds-to-target'])} | "
                f"{_f(r['best-accuracy'], digits=4)} | {_f(r['seconds-to-best'])} |"
            )
        out.append("")
    if scaling:
        out += [
            "## Scaling with the number of silos",
            "",
            "| method | silos | wall s / round | server s / round | synthetic samples / round | "
            "server peak RSS MiB | up MiB / silo / round |",
            "|" + "---|" * 7,
        ]
        for r in scaling:
            out.append(
                f"| {r['method']} | {r['silos']} | {_f(r['wall-seconds-per-round'])} | "
                f"{_f(r['server-seconds-per-round'], digits=2)} | {_f(r['synthetic-samples-per-round'], digits=0)} | "
                f"{_f(r['server-peak-rss-mb'], digits=0)} | {_f(r['bytes-up-per-silo-round'], MB, 3)} |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignfl benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", default="", help="an existing comparison folder to tabulate")
    parser.add_argument("--experiment", default="", help="run this experiment's methods first (conf/experiments/)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    add_overrides_option(parser)
    parser.add_argument("--scaling", nargs="*", type=int, default=[], metavar="SILOS")
    parser.add_argument("--scaling-methods", nargs="+", default=["alignfl"], choices=FEDERATED)
    parser.add_argument(
        "--target", type=float, default=None, help="accuracy to time (default: 0.95 MNIST, 0.80 Fashion-MNIST)"
    )
    parser.add_argument("--out", default="results/benchmark")
    parser.add_argument("--app", default=".", help="the Flower app's folder (the checkout with pyproject.toml)")
    args = parser.parse_args(argv)
    out, app = Path(args.out).resolve(), Path(args.app)
    out.mkdir(parents=True, exist_ok=True)
    try:
        overrides = parse_assignments(args.set)
        rows: list[dict] = []
        scaling = []
        runs = (len(args.methods) if args.experiment else 0) + len(args.scaling) * len(args.scaling_methods)
        with progress("benchmark", runs) as steps:  # each run_methods adds its own line beneath
            if args.experiment:
                steps.doing(args.experiment)
                run_methods(args.experiment, args.methods, overrides, out / "methods", app)
                steps.advance(len(args.methods))
                rows = from_folder(out / "methods", args.target)
            elif args.source:
                rows = from_folder(Path(args.source), args.target)
            for n in args.scaling:
                folder = out / f"scaling-{n}"
                steps.doing(f"{n} silos")
                summaries = run_methods(
                    SCALING_EXPERIMENT, args.scaling_methods, {**scaling_overrides(n), **overrides}, folder, app
                )
                steps.advance(len(args.scaling_methods))
                scaling += [costs(s) for s in summaries.values()]
                (out / "benchmark.json").write_text(json.dumps({"methods": rows, "scaling": scaling}, indent=2))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (out / "benchmark.json").write_text(json.dumps({"methods": rows, "scaling": scaling}, indent=2))
    (out / "benchmark.md").write_text(markdown(rows, scaling))
    print((out / "benchmark.md").read_text())
    print(f"[benchmark] wrote {out}/benchmark.json and benchmark.md")
    return 0
