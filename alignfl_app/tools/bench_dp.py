"""DP vs non-DP local training time, per architecture and generator layout, on a real silo's data.

Usage: ``alignfl bench-dp [--archs mlp-dp mlp conv] [--layout per-class] [--epochs 1] [--silo 0]``.
One line per architecture and mode (non-DP; DP with the fast generator; DP with every draw from the OS's
cryptographic generator) with samples/s and seconds per epoch, then the ratios. A DP "epoch" is
1 / dp-sample-rate steps (each record is drawn once per epoch on average). Everything runs in this process,
one mode after the other, with one torch thread: time it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from alignfl_app.config import parse_node_config, parse_run_config
from alignfl_app.silo.core import Silo
from alignfl_app.training import set_threads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="alignfl bench-dp", description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["mlp-dp", "mlp", "conv"])
    ap.add_argument("--layout", default="per-class", choices=["per-class", "conditional"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--silo", type=int, default=1)
    ap.add_argument("--epsilon", type=float, default=2.0)
    ap.add_argument("--sample-rate", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    torch.set_flush_denormal(True)  # private training flushes denormals; time the non-DP baseline the same way
    steps = max(1, round(args.epochs / args.sample_rate))
    common = {
        "local-epochs": args.epochs,
        "num-server-rounds": 1,
        "client-threads": args.threads,
        "audit": False,
        "generator-layout": args.layout,
        "dp-sample-rate": args.sample_rate,
        "dp-steps": steps,
    }
    private = {**common, "dp-epsilon": args.epsilon}
    modes = {"non-DP": common, "DP": private, "DP-secure": {**private, "dp-secure-noise": True}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.archs:
            times = {}
            for mode, raw in modes.items():
                silo_dir = Path(tmp) / f"{name}-{mode}"
                silo = Silo(
                    parse_run_config(raw),
                    parse_node_config({"partition-id": args.silo, "architecture": name, "silo-dir": str(silo_dir)}),
                )
                silo.privacy()  # noise calibration is done once per run: not part of the epoch time
                t0 = time.perf_counter()
                out = silo.train_round("bench", 1)
                wall = time.perf_counter() - t0
                report = silo_dir / "reports" / "round-001.json"  # a DP silo's figures stay in its own report
                figures = json.loads(report.read_text()) if report.is_file() else out.metrics.record()
                times[mode] = figures["train-seconds"] / args.epochs
                print(
                    f"{name:7s} {mode:9s} {figures['samples-per-second']:9.0f} samples/s  {times[mode]:7.2f} s/epoch"
                    f"  ({wall:.1f} s wall, {len(silo.data.x_train)} records, {len(silo.groups)} group(s))",
                    flush=True,
                )
            print(
                f"{name:7s} DP/non-DP {times['DP'] / times['non-DP']:.2f}x, secure/fast noise "
                f"{times['DP-secure'] / times['DP']:.2f}x",
                flush=True,
            )
    return 0
