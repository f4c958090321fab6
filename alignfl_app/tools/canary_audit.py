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

from alignfl_app.canary import (elbo_scores, epsilon_lower_bound, make_canaries, membership_report,
                                normalised_leakage, run_canary_audit, save_audit_plot)
from alignfl_app.config import RunConfig, parse_node_config, parse_run_config
from alignfl_app.data import SiloData, load_split
from alignfl_app.models import GeneratorSet, one_hot
from alignfl_app.silo import Silo, SiloState


def one_class_silo(cfg: RunConfig, partition: int, silo_dir: Path, records: int) -> Silo:
    """Silo ``partition`` reduced to ``records`` records of its first class (the class the canaries go into)."""
    silo = Silo(cfg, parse_node_config({"partition-id": partition, "silo-dir": str(silo_dir)}))
    d, c = silo.data, silo.data.classes[0]
    keep, keep_test = (d.y_train == c) & ~d.is_outlier, d.y_test == c
    keep &= torch.cumsum(keep.long(), 0) <= records
    silo.data = SiloData(d.silo, (c,), d.x_train[keep], d.y_train[keep], torch.zeros(int(keep.sum()), dtype=torch.bool),
                         d.x_test[keep_test], d.y_test[keep_test], d.heldout_outliers[:0])
    return silo


class SiloTrainer:
    """Trains silo ``partition``'s first class on the given images exactly as the silo would (its rounds, layout,
    architecture and DP recipe), each call a fresh silo with its own ledger; returns the released decoder."""

    def __init__(self, cfg: RunConfig, partition: int, workdir: Path, records: int) -> None:
        self.cfg, self.partition, self.workdir, self.records = cfg, partition, workdir, records
        self.released: list = []  # (decoder, reply metrics) of every call, in order
        self.template = one_class_silo(cfg, partition, workdir / "template", records)

    def __call__(self, images: torch.Tensor):
        silo = one_class_silo(self.cfg, self.partition, self.workdir / f"silo-{len(self.released)}", self.records)
        c = silo.data.classes[0]
        silo.data = dataclasses.replace(silo.data, x_train=images, y_train=torch.full((len(images),), c),
                                        is_outlier=torch.zeros(len(images), dtype=torch.bool))
        silo.groups = silo.generator_groups()
        state: SiloState | None = None
        for rnd in range(1, self.cfg.run.num_server_rounds + 1):
            out = silo.train_round(f"canary-{len(self.released)}", rnd, state)
            state = out.state
        decoder = out.descriptor.build_decoder()
        decoder.load_state_dict(out.decoder_state)
        decoder.eval()
        label = one_hot(torch.zeros(1, dtype=torch.long), out.descriptor.cond_dim)

        def release(z: torch.Tensor) -> torch.Tensor:
            return decoder(z, None if label is None else label.expand(len(z), -1))
        vae = GeneratorSet(silo.architecture, silo.layout, 1)
        vae.load_state_dict(out.state.generators)
        self.released.append((release, out.metrics, vae.vaes[0]))
        return release


def audit_level(base: dict, level: str, args, out: Path) -> dict:
    raw = {**base, "audit": False, "dp-epsilon": 0.0 if level == "none" else float(level), "dp-noise-multiplier": 0.0}
    cfg = parse_run_config(raw)
    with tempfile.TemporaryDirectory(prefix="alignfl-canary-") as tmp:
        train = SiloTrainer(cfg, args.silo, Path(tmp), args.records)
        records = train.template.data.x_train
        latent = train.template.architecture.latent_dim
        other = "fashion-mnist" if cfg.data.dataset == "mnist" else "mnist"
        pool, _ = load_split(str(cfg.data.resolved_data_root()), other, True)
        report = run_canary_audit(train, records, pool, args.canaries, latent, cfg.privacy.delta, seed=args.seed,
                                  steps=args.attack_steps, restarts=args.restarts)
        (target, metrics, target_vae), (_, _, reference_vae) = train.released  # with the canaries, without
        canaries = make_canaries(pool, args.canaries, args.seed)  # the same draw as inside the audit
        white_box = elbo_scores(target_vae, canaries.images, seed=args.seed) - elbo_scores(
            reference_vae, canaries.images, seed=args.seed)
        whole_model = {"epsilon_bound": epsilon_lower_bound(white_box, canaries.included, cfg.privacy.delta),
                       "membership": membership_report(white_box[canaries.included], white_box[~canaries.included],
                                                       seed=args.seed)}
        with torch.no_grad():
            samples = torch.sigmoid(target(torch.randn(2000, latent, generator=torch.Generator().manual_seed(args.seed))))
        leakage = normalised_leakage(samples.reshape(len(samples), *records.shape[1:]), canaries.included_images,
                                     canaries.held_out_images, records, seed=args.seed)
        report = report.model_copy(update={"leakage": leakage})
        epsilon = getattr(metrics, "dp_epsilon", float("inf"))
    (out / f"{level}.json").write_text(report.model_dump_json(indent=1))
    (out / f"{level}-whole-model.json").write_text(json.dumps({k: v.model_dump() for k, v in whole_model.items()},
                                                              indent=1))
    save_audit_plot(report, out / f"{level}.png")
    return {"level": level, "accountant-epsilon": epsilon, "report": report, "whole-model": whole_model}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="alignfl canary-audit", description=__doc__.splitlines()[0])
    ap.add_argument("--run-config", default="conf/experiments/mnist-dp-eps2.toml",
                    help="a TOML file or 'k=v ...' (the recipe to audit)")
    ap.add_argument("--epsilons", nargs="+", default=["1", "2", "8", "none"])
    ap.add_argument("--silo", type=int, default=1)
    ap.add_argument("--canaries", type=int, default=2000)
    ap.add_argument("--records", type=int, default=1000,
                    help="records of the class beside the canaries (few: each canary weighs more)")
    ap.add_argument("--attack-steps", type=int, default=200)
    ap.add_argument("--restarts", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/canary-audit")
    args = ap.parse_args(argv)
    base = {**RunConfig().flat(), **parse_config_args([args.run_config])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [audit_level(base, level, args, out) for level in args.epsilons]
    print(f"{'epsilon':>8} {'accountant':>10} | {'attack':>11} {'lower bound':>11} {'AUC [95% CI]':>22} "
          f"{'TPR@1%FPR [95% CI]':>22} {'TPR@0.1%FPR [95% CI]':>22}")
    table, broken = [], False
    for row in rows:
        for attack, found in (("decoder", row["report"].model_dump()), ("whole VAE", {
                k: v.model_dump() for k, v in row["whole-model"].items()})):
            m, b = found["membership"], found["epsilon_bound"]
            print(f"{row['level']:>8} {row['accountant-epsilon']:>10.3f} | {attack:>11} {b['epsilon']:>11.3f} "
                  f"{_rate(m['auc'], m['auc_ci']):>22} {_rate(m['tpr_at_fpr_1e_2'], m['tpr_at_fpr_1e_2_ci']):>22} "
                  f"{_rate(m['tpr_at_fpr_1e_3'], m['tpr_at_fpr_1e_3_ci']):>22}")
            table.append({"level": row["level"], "accountant-epsilon": row["accountant-epsilon"], "attack": attack,
                          "lower-bound": b["epsilon"], "auc": m["auc"], "auc-ci": m["auc_ci"],
                          "tpr-at-1pct-fpr": m["tpr_at_fpr_1e_2"], "tpr-at-0.1pct-fpr": m["tpr_at_fpr_1e_3"]})
            broken |= b["epsilon"] > row["accountant-epsilon"]
        print(f"{'':>8} {'':>10} | hubness-normalised leakage AUC {row['report'].leakage.membership.auc:.3f}")
    (out / "table.json").write_text(json.dumps(table, indent=1, default=str))
    if broken:
        print("error: a lower bound exceeds the accountant's epsilon: the accounting or the DP code is wrong",
              file=sys.stderr)
    return 1 if broken else 0


def _rate(value: float | None, ci: tuple[float, float] | None) -> str:
    return "-" if value is None else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
