"""Run one experiment for every method on the same partitions and write one comparison folder.

ALIGN-FL, FedAvg and FedProx run as real ``flwr run`` simulations of the app in ``--app`` on a private
SuperLink (alignfl_app/tools/local_superlink.py); local-only and centralised train directly
(alignfl_app/reference.py).

    alignfl compare mnist-fast [--methods alignfl fedavg ...] [--set key=value ...] [--out DIR] [--app .]

Writes <out>/comparison.csv, comparison.md, accuracy.png, samples-<method>.png and one run folder per
method (summary.json, accuracy.png, final model) under <out>/runs/.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from alignfl_app.config import HEADLINE_METRIC, ConfigError, RunConfig, headline_metric
from alignfl_app.experiments import (
    add_overrides_option,
    experiment_overrides,
    load_experiment,
    parse_assignments,
    run_config_string,
)
from alignfl_app.reference import RUNNERS
from alignfl_app.tools.local_superlink import SimulationLink, simulation_superlink
from alignfl_app.tools.progress import progress
from alignfl_app.training import set_threads

FEDERATED = ("alignfl", "fedavg", "fedprox")
METHODS = FEDERATED + tuple(RUNNERS)


def run_federated(
    link: SimulationLink,
    method: str,
    values: dict[str, Any],
    cfg: RunConfig,
    runs_dir: Path,
    cpus_per_client: int,
    timeout: float,
) -> dict:
    """One ``flwr run`` of ``method``; returns its summary.json plus the run's status and wall time."""
    values = {**values, "strategy": method, "results-dir": str(runs_dir), "run-name": method}
    t0 = time.perf_counter()
    run, log = link.run_app(
        run_config_string(values), num_supernodes=cfg.data.num_silos, cpus_per_client=cpus_per_client, timeout=timeout
    )
    wall = time.perf_counter() - t0
    path = runs_dir / method / "summary.json"
    if run["status"] != "finished:completed" or not path.is_file():
        raise RuntimeError(f"{method}: flwr run ended with status {run['status']}; last log lines:\n{log[-3000:]}")
    summary = json.loads(path.read_text())
    summary["flwr-status"], summary["flwr-wall-seconds"] = run["status"], wall
    path.write_text(json.dumps(summary, indent=2))
    return summary


def run_reference(method: str, cfg: RunConfig, runs_dir: Path) -> dict:
    t0 = time.perf_counter()
    summary = RUNNERS[method](cfg, runs_dir / method)
    summary["flwr-wall-seconds"] = time.perf_counter() - t0
    return summary


def run_methods(
    experiment: str,
    methods: list[str],
    overrides: dict[str, Any],
    out: Path,
    app: Path,
    cpus_per_client: int = 1,
    timeout: float = 7200,
) -> dict[str, dict]:
    """Every method of ``methods`` on the experiment's settings (federated ones: ``flwr run`` of ``app``)."""
    cfg = load_experiment(experiment, overrides)
    key = HEADLINE_METRIC[cfg.server.global_model]
    values = {**experiment_overrides(experiment), **overrides}
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    summaries = {}
    federated = [m for m in methods if m in FEDERATED]
    with progress("compare", len(methods)) as steps:
        if federated:
            with (
                tempfile.TemporaryDirectory(prefix="alignfl-compare-") as tmp,
                simulation_superlink(Path(tmp), app) as link,
            ):
                for method in federated:  # one SuperLink, one `flwr run` per method
                    print(f"[compare] {method} (flwr run) ...", flush=True)
                    steps.doing(method)
                    summaries[method] = run_federated(link, method, values, cfg, runs_dir, cpus_per_client, timeout)
                    steps.advance()
                    final = summaries[method][f"final-global-{key}"]
                    print(f"[compare] {method}: final global {key} {final:.4f}", flush=True)
        set_threads(1)
        for method in [m for m in methods if m not in FEDERATED]:
            print(f"[compare] {method} ...", flush=True)
            steps.doing(method)
            summaries[method] = run_reference(method, cfg, runs_dir)
            steps.advance()
            print(f"[compare] {method}: final global {key} {summaries[method][f'final-global-{key}']:.4f}", flush=True)
    return {m: summaries[m] for m in methods}


# --- the comparison tables ----------------------------------------------------------------------
def _key(summary: dict) -> str:
    """The headline metric of a run: accuracy (global classifier) or neg-elbo (global VAE)."""
    return headline_metric(summary["config"])


def _rounds(summary: dict) -> list[dict]:
    return [r for r in summary["rounds"] if (r.get("global") or {}).get(_key(summary)) is not None]


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def comparison_rows(summaries: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per method and round (reference methods: one row, round 'final')."""
    rows = []
    for method, s in summaries.items():
        key = _key(s)
        for r in _rounds(s):
            row: dict[str, Any] = {
                "method": method,
                "round": r["round"] if method in FEDERATED else "final",
                f"global-{key}": r["global"][key],
            }
            for c, a in enumerate(r["global"].get("per-class-accuracy") or []):
                row[f"class-{c}"] = a
            for silo, m in sorted(r["silos"].items()):
                if f"eval-{key}" in m:
                    row[f"{silo}-local-{key}"] = m[f"eval-{key}"]
                if f"global-{key}" in m:
                    row[f"{silo}-global-{key}"] = m[f"global-{key}"]
            rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(experiment: str, summaries: dict[str, dict], cfg: RunConfig) -> str:
    key = HEADLINE_METRIC[cfg.server.global_model]
    name = "accuracy" if key == "accuracy" else "negative ELBO (nats per image, lower is better)"
    finals = {m: _rounds(s)[-1] for m, s in summaries.items() if _rounds(s)}
    out = [
        f"# Comparison: {experiment}",
        "",
        f"{cfg.data.dataset}, {cfg.data.num_silos} silos (classes {cfg.data.silo_classes}, layout "
        f"{cfg.data.silo_layout}), "
        + (
            f"{cfg.data.outliers_per_silo} {cfg.data.outlier_source} outliers in silos {cfg.data.outlier_silos}, "
            if cfg.data.outlier_source
            else "no outliers, "
        )
        + f"{cfg.run.num_server_rounds} rounds x {cfg.local.local_epochs} local epochs, feature space "
        f"{cfg.features.space}; {name} of the final global {cfg.server.global_model} on the real global test set.",
        "",
    ]
    rows = []
    for m, r in finals.items():
        local = [v[f"eval-{key}"] for v in r["silos"].values() if f"eval-{key}" in v]
        balanced = [r["global"].get("balanced-accuracy")] if key == "accuracy" else []
        rows.append(
            [
                m,
                r["global"][key],
                *balanced,
                sum(local) / len(local) if local else None,
                summaries[m].get("flwr-wall-seconds"),
            ]
        )
    balanced_header = ["global balanced accuracy (mean per class)"] if key == "accuracy" else []
    out += [
        f"## Final {key}",
        "",
        _table(["method", f"global {key}", *balanced_header, f"mean silo local-test {key}", "wall s"], rows),
        "",
    ]
    n_rounds = max((len(_rounds(s)) for m, s in summaries.items() if m in FEDERATED), default=0)
    if n_rounds:
        rows = [[m] + [r["global"][key] for r in _rounds(s)] for m, s in summaries.items() if m in FEDERATED]
        out += [
            f"## Global {key} per round",
            "",
            _table(["method"] + [f"round {i + 1}" for i in range(n_rounds)], rows),
            "",
        ]
    if key == "accuracy":
        rows = [[m] + list(r["global"].get("per-class-accuracy") or []) for m, r in finals.items()]
        out += [
            "## Per-class accuracy (final, global test set)",
            "",
            _table(["method"] + list(cfg.data.class_names), rows),
            "",
        ]
    order = {name: k for k, name in enumerate(cfg.data.names)}  # the run's silo list, named silos included
    silos = sorted({s for r in finals.values() for s in r["silos"]}, key=lambda s: (order.get(s, len(order)), s))
    rows = [[m] + [r["silos"].get(s, {}).get(f"eval-{key}") for s in silos] for m, r in finals.items()]
    out += [
        f"## Per-silo {key} (final global model on each silo's local test set; local-only: its own model)",
        "",
        _table(["method"] + silos, rows),
        "",
    ]
    if "local-only" in finals:
        r = finals["local-only"]
        out += [
            "Local-only, each silo's own model on the global test set: "
            + ", ".join(
                f"{s} {_fmt(r['silos'][s].get(f'global-{key}'))}"
                + (
                    f" (balanced {_fmt(r['silos'][s]['global-balanced-accuracy'])})"
                    if "global-balanced-accuracy" in r["silos"][s]
                    else ""
                )
                for s in silos
                if s in r["silos"]
            ),
            "",
        ]
    return "\n".join(out)


def plot(summaries: dict[str, dict], path: Path, title: str, key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    rounds_max = 1
    for m, s in summaries.items():
        if m in FEDERATED and _rounds(s):
            xs = [r["round"] for r in _rounds(s)]
            rounds_max = max(rounds_max, xs[-1])
            ax.plot(xs, [r["global"][key] for r in _rounds(s)], "o-", lw=2, label=m)
    for m, s in summaries.items():
        if m not in FEDERATED and _rounds(s):
            ax.axhline(
                _rounds(s)[-1]["global"][key],
                ls="--",
                alpha=0.7,
                color="gray" if m == "local-only" else "black",
                label=f"{m} (reference)",
            )
    ax.set_xlabel("round")
    if key == "accuracy":
        ax.set_ylabel("global test accuracy")
        ax.set_ylim(0, 1)
    else:
        ax.set_ylabel(f"global test {key} (lower is better)")
    ax.set_xticks(range(1, rounds_max + 1))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_comparison(experiment: str, summaries: dict[str, dict], cfg: RunConfig, out: Path) -> None:
    write_csv(comparison_rows(summaries), out / "comparison.csv")
    (out / "comparison.md").write_text(markdown(experiment, summaries, cfg))
    key = HEADLINE_METRIC[cfg.server.global_model]
    plot(summaries, out / "accuracy.png", f"{experiment}: global {key} per round", key)
    for m in summaries:
        grids = sorted((out / "runs" / m / "samples").glob("round-*.png"))
        if grids:
            shutil.copyfile(grids[-1], out / f"samples-{m}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignfl compare", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="name in conf/experiments/ (e.g. mnist-fast) or a TOML file")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    add_overrides_option(parser, "run-config overrides for all methods")
    parser.add_argument("--out", default="", help="comparison folder (default: results/compare-<experiment>)")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--app", default=".", help="the Flower app's folder (the checkout with pyproject.toml)")
    args = parser.parse_args(argv)
    try:
        overrides = parse_assignments(args.set)
        cfg = load_experiment(args.experiment, overrides)
        if cfg.data.is_folder and not cfg.data.global_test_dir:
            raise ConfigError(
                "compare judges every method on one global test set: set global-test-dir for dataset='folder'"
            )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or f"results/compare-{Path(args.experiment).stem}").resolve()
    summaries = run_methods(args.experiment, args.methods, overrides, out, Path(args.app), args.cpus_per_client)
    write_comparison(args.experiment, summaries, cfg, out)
    print((out / "comparison.md").read_text())
    print(f"[compare] wrote {out}/comparison.csv, comparison.md, accuracy.png")
    return 0
