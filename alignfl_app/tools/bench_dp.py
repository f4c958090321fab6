"""DP vs non-DP local training time per epoch, per architecture, on a real silo's data.

Usage: ``nice -n 10 alignfl bench-dp [--archs mlp conv] [--epochs 1] [--silo 0]``.
Prints one line per architecture and mode (samples/s, seconds per epoch) and the DP/non-DP ratio.
Both modes run back to back in this process, with one torch thread and denormals flushed to zero
(private training always flushes them; the non-DP baseline is timed the same way, which only makes it faster).
"""

from __future__ import annotations

import argparse

import torch

import tempfile
from pathlib import Path

from alignfl_app.config import parse_node_config, parse_run_config
from alignfl_app.silo import Silo
from alignfl_app.training import set_threads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="alignfl bench-dp", description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["mlp", "conv"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--silo", type=int, default=0)
    ap.add_argument("--epsilon", type=float, default=2.0)
    ap.add_argument("--lipschitz", default="none", choices=["none", "gp", "gp-one-sided", "spectral"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep-denormals", action="store_true", help="do not flush denormals (DP training still does)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    torch.set_flush_denormal(not args.keep_denormals)  # private training flushes them; compare like with like
    common = {"local-epochs": args.epochs, "num-server-rounds": 1, "client-threads": args.threads, "audit": False,
              "lipschitz": args.lipschitz, "lipschitz-weight": 0.1 if args.lipschitz.startswith("gp") else 0.0}
    configs = {"non-DP": parse_run_config(common), "DP": parse_run_config({**common, "dp-epsilon": args.epsilon})}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.archs:
            node = {"partition-id": args.silo, "architecture": name, "silo-dir": tmp,
                    "privacy-ledger": str(Path(tmp) / f"{name}.json")}
            times = {}
            for mode, cfg in configs.items():
                silo = Silo(cfg, parse_node_config(node))  # the silo's own round: same composition as in a run
                if mode == "DP" and name == args.archs[0]:
                    plan = silo.privacy.plan
                    print(f"silo {args.silo}: {len(silo.data.x_train)} records, batch {cfg.local.batch_size}, "
                          f"{args.epochs} epoch(s), {args.threads} thread(s), DP sigma {plan.noise_multiplier:.3f} for "
                          f"epsilon {args.epsilon}, lipschitz {args.lipschitz}")
                m = silo.train_round(1, None).metrics
                times[mode] = m.train_seconds / args.epochs
                print(f"{name:6s} {mode:7s} {m.samples_per_second:9.0f} samples/s  {times[mode]:7.2f} s/epoch",
                      flush=True)
            print(f"{name:6s} DP/non-DP epoch-time ratio: {times['DP'] / times['non-DP']:.2f}x", flush=True)
    return 0
