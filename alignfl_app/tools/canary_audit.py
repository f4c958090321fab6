"""Canary audit of a silo's released decoder at several privacy levels: an epsilon lower bound from one run.

    alignfl canary-audit [--run-config conf/experiments/mnist-dp-eps2.toml] [--epsilons 1 2 8 none]
                         [--silo 1] [--canaries 2000] [--out results/canary-audit]

For each level, one class of silo ``--silo`` (its first class) is trained exactly as that silo trains it
(``Silo.train_round``: same layout, architecture, rounds, DP recipe, a fresh ledger in a temporary silo-dir)
on its records plus the included half of ``--canaries`` out-of-domain images (the other dataset), each in or out
by a fair coin. The released decoder alone is then attacked (reconstruction by optimising its latent input);
``alignfl_app.canary`` turns the scores into a one-run epsilon lower bound (Steinke, Nasr, Jagielski 2023,
95% confidence), AUC and TPR at 1% / 0.1% FPR with bootstrap intervals, and a hubness-normalised leakage AUC.
Writes ``<out>/<level>.json`` and ``.png`` and prints one table; the bound must never exceed the accountant's
epsilon (the tool exits 1 if it does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch
from flwr.common.config import parse_config_args

from alignfl_app.canary import AuditReport, make_canaries, normalised_leakage, run_canary_audit, save_audit_plot
from alignfl_app.config import RunConfig, parse_node_config, parse_run_config
from alignfl_app.data import SiloData, load_split
from alignfl_app.models import one_hot
from alignfl_app.silo import Silo, SiloState
from alignfl_app.store import GeneratorDescriptor


def one_class_silo(cfg: RunConfig, partition: int, silo_dir: Path) -> Silo:
    """Silo ``partition`` reduced to its first class (the class the canaries are inserted into)."""
    silo = Silo(cfg, parse_node_config({"partition-id": partition, "silo-dir": str(silo_dir)}))
    d, c = silo.data, silo.data.classes[0]
    keep, keep_test = (d.y_train == c) & ~d.is_outlier, d.y_test == c
    silo.data = SiloData(d.silo, (c,), d.x_train[keep], d.y_train[keep], torch.zeros(int(keep.sum()), dtype=torch.bool),
                         d.x_test[keep_test], d.y_test[keep_test], d.heldout_outliers[:0])
    return silo


def trainer(silo: Silo, run: str):
    """Train the silo's one class on the given images for the run's rounds; return the released decoder."""
    def train(images: torch.Tensor):
        c = silo.data.classes[0]
        silo.data = dataclasses.replace(silo.data, x_train=images, y_train=torch.full((len(images),), c),
                                        is_outlier=torch.zeros(len(images), dtype=torch.bool))
        silo.groups = silo._groups()
        state: SiloState | None = None
        for rnd in range(1, silo.cfg.run.num_server_rounds + 1):
            out = silo.train_round(run, rnd, state)
            state = out.state
        train.descriptor, train.metrics = out.descriptor, out.metrics
        decoder = GeneratorDescriptor.model_validate(out.descriptor.model_dump()).build_decoder()
        decoder.load_state_dict(out.decoder_state)
        decoder.eval()
        label = one_hot(torch.zeros(1, dtype=torch.long), out.descriptor.cond_dim)

        def release(z: torch.Tensor) -> torch.Tensor:
            return decoder(z, None if label is None else label.expand(len(z), -1))
        train.decoder = release
        return release
    return train


def audit_level(base: dict, level: str, args, out: Path) -> dict:
    raw = {**base, "audit": False, "dp-epsilon": 0.0 if level == "none" else float(level), "dp-noise-multiplier": 0.0}
    cfg = parse_run_config(raw)
    with tempfile.TemporaryDirectory(prefix="alignfl-canary-") as tmp:
        silo = one_class_silo(cfg, args.silo, Path(tmp))
        records = silo.data.x_train
        other = "fashion-mnist" if cfg.data.dataset == "mnist" else "mnist"
        pool, _ = load_split(str(cfg.data.resolved_data_root()), other, True)
        train = trainer(silo, f"canary-{level}")
        report = run_canary_audit(train, records, pool, args.canaries, silo.architecture.latent_dim,
                                  cfg.privacy.delta, seed=args.seed, steps=args.attack_steps)
        with torch.no_grad():
            samples = torch.sigmoid(train.decoder(torch.randn(2000, silo.architecture.latent_dim,
                                                              generator=torch.Generator().manual_seed(args.seed))))
        canaries = make_canaries(pool, args.canaries, args.seed)  # the same draw as inside the audit
        leakage = normalised_leakage(samples.reshape(len(samples), *records.shape[1:]), canaries.included_images,
                                     canaries.held_out_images, records, seed=args.seed)
        report = report.model_copy(update={"leakage": leakage})
        epsilon = getattr(train.metrics, "dp_epsilon", float("inf"))
    (out / f"{level}.json").write_text(report.model_dump_json(indent=1))
    save_audit_plot(report, out / f"{level}.png")
    return {"level": level, "accountant-epsilon": epsilon, "report": report}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="alignfl canary-audit", description=__doc__.splitlines()[0])
    ap.add_argument("--run-config", default="conf/experiments/mnist-dp-eps2.toml",
                    help="a TOML file or 'k=v ...' (the recipe to audit)")
    ap.add_argument("--epsilons", nargs="+", default=["1", "2", "8", "none"])
    ap.add_argument("--silo", type=int, default=1)
    ap.add_argument("--canaries", type=int, default=2000)
    ap.add_argument("--attack-steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/canary-audit")
    args = ap.parse_args(argv)
    base = {**RunConfig().flat(), **parse_config_args([args.run_config])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [audit_level(base, level, args, out) for level in args.epsilons]
    print(f"{'epsilon':>8} {'by accountant':>13} {'lower bound':>11} {'AUC [95% CI]':>22} {'TPR@1%FPR':>18} "
          f"{'TPR@0.1%FPR':>18} {'leakage AUC':>11}")
    broken = False
    for row in rows:
        r: AuditReport = row["report"]
        m, b = r.membership, r.epsilon_bound
        def rate(v, ci):
            return "-" if v is None else f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
        print(f"{row['level']:>8} {row['accountant-epsilon']:>13.3f} {b.epsilon:>11.3f} "
              f"{m.auc:.3f} [{m.auc_ci[0]:.3f}, {m.auc_ci[1]:.3f}] {rate(m.tpr_at_fpr_1e_2, m.tpr_at_fpr_1e_2_ci):>18} "
              f"{rate(m.tpr_at_fpr_1e_3, m.tpr_at_fpr_1e_3_ci):>18} {r.leakage.membership.auc:>11.3f}")
        broken |= b.epsilon > row["accountant-epsilon"]
    (out / "table.json").write_text(json.dumps([{"level": r["level"], "accountant-epsilon": r["accountant-epsilon"],
                                                  "lower-bound": r["report"].epsilon_bound.epsilon,
                                                  "auc": r["report"].membership.auc} for r in rows], indent=1,
                                                default=str))
    if broken:
        print("error: a lower bound exceeds the accountant's epsilon: the accounting or the DP code is wrong",
              file=sys.stderr)
    return 1 if broken else 0
