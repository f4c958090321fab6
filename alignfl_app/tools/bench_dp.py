"""DP vs non-DP local training time per epoch, per architecture, on a real silo's data.

Usage: ``nice -n 10 alignfl bench-dp [--archs mlp conv] [--epochs 1] [--silo 0]``.
Prints one line per architecture and mode (samples/s, seconds per epoch) and the DP/non-DP ratio.
Both modes run back to back in this process, with one torch thread and denormals flushed to zero
(private training always flushes them; the non-DP baseline is timed the same way, which only makes it faster).
"""

from __future__ import annotations

import argparse

import torch

from alignfl_app.config import IMAGE_SHAPE, load_architecture, parse_run_config
from alignfl_app.data import build_silo_data
from alignfl_app.experiments import app_defaults
from alignfl_app.models import VAE
from alignfl_app.privacy import plan_dp
from alignfl_app.training import set_threads, train_vae


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
    raw = app_defaults()
    cfg = parse_run_config({**raw, "local-epochs": args.epochs, "num-server-rounds": 1})
    data = build_silo_data(cfg, args.silo, cfg.resolved_data_root())
    n = len(data.x_train)
    dp_cfg = parse_run_config({**raw, "local-epochs": args.epochs, "num-server-rounds": 1, "dp-epsilon": args.epsilon})
    plan = plan_dp(dp_cfg, n)
    lip = dict(lipschitz=args.lipschitz, lipschitz_weight=0.1 if args.lipschitz.startswith("gp") else 0.0)
    print(f"silo {args.silo}: {n} records, batch {cfg.batch_size}, {args.epochs} epoch(s), {args.threads} thread(s), "
          f"DP sigma {plan.noise_multiplier:.3f} for epsilon {args.epsilon}, lipschitz {args.lipschitz}")
    for name in args.archs:
        spec = load_architecture(name)
        times = {}
        for mode in ("non-DP", "DP"):
            torch.manual_seed(0)
            vae = VAE(spec, len(data.classes), IMAGE_SHAPE)
            rep = train_vae(vae, data.x_train, data.y_train, data.classes, epochs=args.epochs,
                            batch_size=cfg.batch_size, lr=cfg.learning_rate, seed=1,
                            dp_plan=plan if mode == "DP" else None, **lip)
            times[mode] = rep.seconds / args.epochs
            print(f"{name:6s} {mode:7s} {rep.examples_seen / rep.seconds:9.0f} samples/s  "
                  f"{times[mode]:7.2f} s/epoch  loss {rep.loss:.2f}", flush=True)
        print(f"{name:6s} DP/non-DP epoch-time ratio: {times['DP'] / times['non-DP']:.2f}x", flush=True)
    return 0
