"""Privacy-utility sweep: epsilon x Lipschitz weight x dataset, each a real ``flwr run`` (simulation).

    nice -n 10 alignfl sweep [--datasets mnist fashion-mnist] [--epsilons 1 2 4 8 none] [--weights 0 0.1 1] \
        [--base 'num-server-rounds=3 ...'] [--out results/sweep] [--app .]

Lipschitz weight 0 means no penalty; > 0 the two-sided gradient penalty (``lipschitz='gp'``). Each run has
its own simulated silos (``ALIGNFL_SILOS_ROOT=<out>/silos/<run>``: their ledgers never mix). Writes ``<out>/sweep.csv``,
``<out>/sweep.md`` and ``<out>/sweep.png``; ``--report-only`` rebuilds them from finished runs.
Columns: global accuracy (real test set, last round), outlier mapping rate, leakage rate, member-nearer
rate, outlier share, MIA AUC (outlier silos, mean), largest epsilon any silo spent. ``--reaudit``
recomputes the decoder-only audit (leakage rate, member-nearer rate, MIA AUC) of finished cells from their
stored generators (``alignfl audit``), for runs made before the member-nearer rate existed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

from alignfl_app.audit.outliers import audit_run
from alignfl_app.tools.local_superlink import simulation_superlink
from alignfl_app.tools.progress import progress

COLUMNS = [
    "dataset",
    "epsilon",
    "lipschitz_weight",
    "status",
    "global_accuracy",
    "mapping_rate",
    "leakage_rate",
    "member_nearer_rate",
    "outlier_share",
    "mia_auc",
    "epsilon_spent_max",
    "run",
]
AUDIT_COLUMNS = (
    ("mapping-rate", "mapping_rate"),
    ("leakage-rate", "leakage_rate"),
    ("member-nearer-rate", "member_nearer_rate"),
    ("outlier-share", "outlier_share"),
    ("mia-auc", "mia_auc"),
)


def run_name(dataset: str, eps: str, weight: str) -> str:
    return f"sweep-{dataset}-eps{eps}-lip{weight}"


def run_config(dataset: str, eps: str, weight: str, base: str, out: Path) -> str:
    name = run_name(dataset, eps, weight)
    parts = [base, f"dataset='{dataset}'", f"run-name='{name}'", f"results-dir='{out}'"]
    if eps != "none":
        parts.append(f"dp-epsilon={float(eps)}")
    if float(weight) > 0:
        parts.append(f"lipschitz='gp' lipschitz-weight={float(weight)}")
    return " ".join(p for p in parts if p)


def row_of(summary_path: Path, dataset: str, eps: str, weight: str) -> dict:
    row = {"dataset": dataset, "epsilon": eps, "lipschitz_weight": weight, "run": summary_path.parent.name}
    if not summary_path.is_file():
        return {**row, "status": "missing"}
    s = json.loads(summary_path.read_text())
    row["status"] = s.get("status")
    row["global_accuracy"] = s.get("final-global-accuracy")
    spent, audits = [], {}
    for rnd in s.get("rounds", []):
        for silo, m in rnd.get("silos", {}).items():
            if "dp-epsilon-spent" in m:
                spent.append(m["dp-epsilon-spent"])
            if "audit-mapping-rate" in m:
                audits[silo] = m
    row["epsilon_spent_max"] = max(spent) if spent else None
    silos = summary_path.parent.parent / "silos" / summary_path.parent.name  # the simulated silos' own reports
    for report in sorted(silos.glob("*/reports/round-*.json")):
        figures = json.loads(report.read_text())
        if "audit-mia-auc" in figures:
            audits[report.parent.parent.name] = figures
    recomputed = summary_path.parent / "decoder-audit.json"  # --reaudit: same decoder, seed and samples
    if recomputed.is_file():
        for silo, m in json.loads(recomputed.read_text()).items():
            audits[silo] = {**m, **audits.get(silo, {})}  # numbers recorded in the run win
    for key, col in AUDIT_COLUMNS:
        vals = [m[f"audit-{key}"] for m in audits.values() if m.get(f"audit-{key}") is not None]
        row[col] = sum(vals) / len(vals) if vals else None
    return row


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS})
    lines = ["| " + " | ".join(COLUMNS[:-1]) + " |", "|" + "---|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in COLUMNS[:-1]) + " |" for r in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        "global_accuracy": "global accuracy",
        "mapping_rate": "outlier mapping rate",
        "leakage_rate": "outlier leakage rate",
        "mia_auc": "outlier MIA AUC",
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(17, 3.8))
    for ds in sorted({r["dataset"] for r in rows}):
        for wgt in sorted({r["lipschitz_weight"] for r in rows}, key=float):
            pts = [
                r
                for r in rows
                if r["dataset"] == ds and r["lipschitz_weight"] == wgt and r.get("global_accuracy") is not None
            ]
            pts.sort(key=lambda r: float("inf") if r["epsilon"] == "none" else float(r["epsilon"]))
            xs = [r["epsilon"] for r in pts]
            for ax, key in zip(axes, panels, strict=True):
                ys = [r.get(key) if r.get(key) is not None else float("nan") for r in pts]
                ax.plot(xs, ys, "o-", label=f"{ds}, lambda={wgt}")
    for ax, (key, title) in zip(axes, panels.items(), strict=True):
        ax.set_xlabel("epsilon ('none' = no DP)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1)  # every panel is a rate: the whole range, no axis cut to exaggerate a difference
        if key == "mia_auc":
            ax.axhline(0.5, color="k", linestyle="--", linewidth=1, label="chance")
        elif key == "global_accuracy":
            ax.axhline(0.1, color="k", linestyle="--", linewidth=1, label="chance (10 classes)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)


def run_cell(
    cell: tuple[str, str, str], args: argparse.Namespace, out: Path, cells: list[tuple[str, str, str]]
) -> None:
    """One cell's run (a SuperLink and a `flwr run`), then the report of every cell so far."""
    print(f"[sweep] {run_name(*cell)}", flush=True)
    os.environ["ALIGNFL_SILOS_ROOT"] = str(out / "silos" / run_name(*cell))  # the cell's own silos
    with (
        tempfile.TemporaryDirectory(prefix="alignfl-sweep-") as tmp,
        simulation_superlink(Path(tmp), Path(args.app)) as link,
    ):
        t0 = time.perf_counter()
        run, log = link.run_app(
            run_config(*cell, args.base, out), num_supernodes=args.num_supernodes, timeout=args.timeout
        )
    print(f"[sweep] {run_name(*cell)}: {run['status']} in {time.perf_counter() - t0:.0f} s", flush=True)
    if run["status"] != "finished:completed":
        print(log[-3000:], flush=True)
    write_report([row_of(out / run_name(*c) / "summary.json", *c) for c in cells], out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="alignfl sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    ap.add_argument("--epsilons", nargs="+", default=["1", "2", "4", "8", "none"])
    ap.add_argument("--weights", nargs="+", default=["0", "0.1", "1"])
    ap.add_argument("--base", default="", help="run-config overrides shared by every run")
    ap.add_argument("--out", default="results/sweep")
    ap.add_argument("--app", default=".", help="the Flower app's folder (the checkout with pyproject.toml)")
    ap.add_argument("--num-supernodes", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=7200, help="seconds one `flwr run` may take")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--reaudit", action="store_true", help="recompute the decoder-only audit of finished cells")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    cells = [(ds, eps, wgt) for ds in args.datasets for eps in args.epsilons for wgt in args.weights]
    todo = [c for c in cells if not (out / run_name(*c) / "summary.json").is_file()]
    if todo and not args.report_only:
        with progress("sweep", len(todo)) as steps:
            for cell in todo:  # a SuperLink and a `flwr run` per cell; finished cells are kept (re-run resumes)
                steps.doing(run_name(*cell))
                run_cell(cell, args, out, cells)
                steps.advance()
    if args.reaudit:
        for c in cells:
            run = out / run_name(*c)
            if (run / "summary.json").is_file() and not (run / "decoder-audit.json").is_file():
                (run / "decoder-audit.json").write_text(json.dumps(audit_run(run), indent=2) + "\n")
    rows = [row_of(out / run_name(*c) / "summary.json", *c) for c in cells]
    write_report(rows, out)
    print((out / "sweep.md").read_text())
    return 0 if all(r.get("status") == "completed" for r in rows) else 1
