"""Canary audit of a silo's released decoder at several privacy levels: an epsilon lower bound from one run.

    alignfl canary-audit [--run-config conf/experiments/mnist-dp-eps2.toml] [--epsilons 1 2 8 none]
                         [--canary-kind gradient image] [--silo 1] [--canaries 2000] [--out results/canary-audit]

For each kind and level, one class of silo ``--silo`` (its first class) is trained exactly as that silo trains it
(``Silo.train_round``: same layout, architecture, rounds, DP recipe, a fresh ledger in a temporary silo-dir) with
``--canaries`` canaries, each in or out by a fair coin:

* ``gradient`` (default): virtual records whose gradient is a Dirac vector on one decoder weight, sampled, clipped
  and noised as records are (``CanaryPrivacy`` wraps the silo's privacy; the training code is the silo's own). The
  white-box score is how far the released decoder moved each canary's weight from the known initial one.
* ``image``: out-of-domain images (the other dataset) added to the records. The released decoder alone is attacked
  (reconstruction by optimising its latent input), and the whole VAE (ELBO).

``alignfl_app.audit.canary`` turns the scores into a one-run epsilon lower bound (Steinke, Nasr, Jagielski 2023, 95%
confidence), AUC and TPR at 1% / 0.1% FPR with bootstrap intervals (and, for images, a hubness-normalised leakage
AUC). Writes ``<out>/<kind>-<level>[-whole-vae].json`` and ``.png``, ``table.json``, and prints one table; the bound
must never exceed the accountant's epsilon (the tool exits 1 if it does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.common.config import parse_config_args
from torch import nn

from alignfl_app.audit.canary import (
    AuditReport,
    DecoderLike,
    GradientCanaryInjection,
    elbo_scores,
    epsilon_lower_bound,
    make_canaries,
    membership_report,
    normalised_leakage,
    run_canary_audit,
    run_gradient_canary_audit,
    save_audit_plot,
)
from alignfl_app.config import RunConfig, parse_node_config, parse_run_config
from alignfl_app.contract.replies import GeneratorTrainMetrics, PrivateTrainMetrics
from alignfl_app.data.datasets import SiloData, load_split
from alignfl_app.models.vae import GeneratorSet, one_hot
from alignfl_app.privacy.dpsgd import DifferentialPrivacy, DPCarry, DPRound, NoPrivacy, PlainRound
from alignfl_app.privacy.ledger import LedgerAnchor
from alignfl_app.silo.core import Silo, SiloState
from alignfl_app.tools.progress import progress
from alignfl_app.training import GradientRule


class CanarySession:
    """A round's session (``PlainRound`` or ``DPRound``) whose one generator group also holds the injection's
    canaries as records: its count, batches and gradient rule see them, everything else is the session's own."""

    def __init__(self, session: PlainRound | DPRound, injection: GradientCanaryInjection) -> None:
        self.session, self.injection = session, injection

    @property
    def learning_rate(self) -> float:
        return self.session.learning_rate

    def rule(self, group: int, model: nn.Module) -> GradientRule:
        return self.injection.rule(self.session.rule(group, model), model, model.decoder)

    def batches(self, group: int, n: int, seed: int) -> Iterator[torch.Tensor]:
        return self.injection.batches(self.session.batches(group, n + self.injection.num_virtual, seed))

    def carry(self) -> DPCarry | None:
        return self.session.carry()

    def public_report(self) -> dict[str, float]:
        return self.session.public_report()

    @property
    def ledger_anchor(self) -> LedgerAnchor | None:
        return self.session.ledger_anchor


class CanaryPrivacy:
    """The silo's privacy, opening ``CanarySession`` rounds (the noisy record count includes the canaries)."""

    def __init__(self, privacy: NoPrivacy | DifferentialPrivacy, injection: GradientCanaryInjection) -> None:
        self.privacy, self.injection = privacy, injection
        self.releases_record_figures = privacy.releases_record_figures

    def open_round(self, run: str, server_round: int, group_sizes: list[int], carry: DPCarry | None) -> CanarySession:
        if len(group_sizes) != 1:
            raise ValueError("gradient canaries go into a silo of one generator group")
        sizes = [group_sizes[0] + self.injection.num_virtual]
        return CanarySession(self.privacy.open_round(run, server_round, sizes, carry), self.injection)


class AuditedSilo(Silo):
    """A silo whose rounds carry gradient canaries when it holds an injection (else a plain ``Silo``)."""

    injection: GradientCanaryInjection | None = None

    def privacy(self) -> NoPrivacy | DifferentialPrivacy | CanaryPrivacy:
        privacy = super().privacy()
        return privacy if self.injection is None else CanaryPrivacy(privacy, self.injection)


def one_class_silo(cfg: RunConfig, partition: int, silo_dir: Path, records: int) -> AuditedSilo:
    """Silo ``partition`` reduced to ``records`` records of its first class (the class the canaries go into), on
    the CPU (the canaries and scores are built there)."""
    silo = AuditedSilo(
        cfg, parse_node_config({"partition-id": partition, "silo-dir": str(silo_dir), "client-device": "cpu"})
    )
    d, c = silo.data, silo.data.classes[0]
    keep, keep_test = (d.y_train == c) & ~d.is_outlier, d.y_test == c
    keep &= torch.cumsum(keep.long(), 0) <= records
    silo.data = SiloData(
        d.silo,
        (c,),
        d.x_train[keep],
        d.y_train[keep],
        torch.zeros(int(keep.sum()), dtype=torch.bool),
        d.x_test[keep_test],
        d.y_test[keep_test],
        d.heldout_outliers[:0],
    )
    silo.groups = silo.generator_groups()
    return silo


@dataclass(frozen=True)
class Release:
    """What one training run of the audited class released (the decoder) and kept (the whole VAE)."""

    decoder: DecoderLike  # latent batch -> image logits, as the server would call it
    vae: nn.Module  # encoder and decoder, for white-box attacks
    metrics: GeneratorTrainMetrics | PrivateTrainMetrics


class SiloTrainer:
    """Trains silo ``partition``'s first class on the given images exactly as the silo would (its rounds, layout,
    architecture and DP recipe), each call a fresh silo with its own ledger; returns the released decoder."""

    def __init__(self, cfg: RunConfig, partition: int, workdir: Path, records: int) -> None:
        self.cfg, self.partition, self.workdir, self.records = cfg, partition, workdir, records
        self.released: list[Release] = []  # every run, in order
        self.template = one_class_silo(cfg, partition, workdir / "template", records)

    def initial_vae(self) -> nn.Module:
        """The VAE every run starts from (the silo's seeded initialisation): the white-box auditor knows it."""
        return self.template.new_generators().vaes[0]

    def train(self, images: torch.Tensor, injection: GradientCanaryInjection | None = None) -> Release:
        """One run on ``images`` (and the injection's gradient canaries, if any)."""
        silo = one_class_silo(self.cfg, self.partition, self.workdir / f"silo-{len(self.released)}", self.records)
        c = silo.data.classes[0]
        silo.data = dataclasses.replace(
            silo.data,
            x_train=images,
            y_train=torch.full((len(images),), c),
            is_outlier=torch.zeros(len(images), dtype=torch.bool),
        )
        silo.groups = silo.generator_groups()
        silo.injection = injection
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
        self.released.append(Release(release, vae.vaes[0], out.metrics))
        return self.released[-1]

    def __call__(self, images: torch.Tensor) -> DecoderLike:
        return self.train(images).decoder


GRADIENT_CANARY_NORM = 100.0
"""A gradient canary's norm without DP: far above what real records put on one weight, so the canary dominates
Adam's running RMS of that weight, and a larger norm moves it no further (one run each, random directions: bounds
2.0, 2.7 and 2.4 for norms 10, 100 and 1,000). Under DP the norm is the step's clip bound."""


def level_config(base: dict, level: str) -> RunConfig:
    """The recipe at one privacy level: dp-epsilon ``level`` (its noise calibrated by the accountant), or no DP."""
    return parse_run_config(
        {**base, "audit": False, "dp-epsilon": 0.0 if level == "none" else float(level), "dp-noise-multiplier": 0.0}
    )


def accountant_epsilon(release: Release) -> float:
    return getattr(release.metrics, "dp_epsilon", float("inf"))


def image_audit(cfg: RunConfig, args: argparse.Namespace, workdir: Path) -> tuple[float, dict[str, AuditReport]]:
    """Out-of-domain image canaries: the decoder reconstruction attack (with the hubness-normalised leakage) and the
    whole-VAE ELBO attack, both calibrated by a reference run without canaries."""
    train = SiloTrainer(cfg, args.silo, workdir, args.records)
    records = train.template.data.x_train
    latent = train.template.architecture.latent_dim
    other = "fashion-mnist" if cfg.data.dataset == "mnist" else "mnist"
    pool = load_split(cfg.data.resolved_data_root(), other, True).images
    report = run_canary_audit(
        train,
        records,
        pool,
        args.canaries,
        latent,
        cfg.privacy.delta,
        seed=args.seed,
        steps=args.attack_steps,
        restarts=args.restarts,
    )
    target, reference = train.released  # with the canaries, without
    canaries = make_canaries(pool, args.canaries, args.seed)  # the same draw as inside the audit
    white_box = elbo_scores(target.vae, canaries.images, seed=args.seed) - elbo_scores(
        reference.vae, canaries.images, seed=args.seed
    )
    member, nonmember = white_box[canaries.included], white_box[~canaries.included]
    whole_vae = AuditReport(
        epsilon_bound=epsilon_lower_bound(white_box, canaries.included, cfg.privacy.delta),
        membership=membership_report(member, nonmember, seed=args.seed),
        member_scores=member.tolist(),
        nonmember_scores=nonmember.tolist(),
        seed=args.seed,
        attack="whole-VAE ELBO (16 posterior draws), minus a reference VAE's trained without canaries",
    )
    with torch.no_grad():
        z = torch.randn(2000, latent, generator=torch.Generator().manual_seed(args.seed))
        samples = torch.sigmoid(target.decoder(z))
    leakage = normalised_leakage(
        samples.reshape(len(samples), *records.shape[1:]),
        canaries.included_images,
        canaries.held_out_images,
        records,
        seed=args.seed,
    )
    return accountant_epsilon(target), {
        "decoder": report.model_copy(update={"leakage": leakage}),
        "whole VAE": whole_vae,
    }


def gradient_audit(cfg: RunConfig, args: argparse.Namespace, workdir: Path) -> tuple[float, dict[str, AuditReport]]:
    """Dirac gradient canaries injected into the silo's own training (white box: the auditor knows the initial
    decoder and sees the released one); calibrated by a reference run without DP only."""
    train = SiloTrainer(cfg, args.silo, workdir, args.records)
    records = train.template.data.x_train
    report = run_gradient_canary_audit(
        lambda injection: train.train(records, injection).vae.decoder,
        train.initial_vae().decoder,
        len(records),
        args.canaries,
        cfg.privacy.delta,
        seed=args.seed,
        magnitude=GRADIENT_CANARY_NORM,
        calibrate=not cfg.privacy.enabled,
    )
    return accountant_epsilon(train.released[-1]), {"displacement": report}


AUDITS = {"gradient": gradient_audit, "image": image_audit}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="alignfl canary-audit", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--run-config",
        default="conf/experiments/mnist-dp-eps2.toml",
        help="a TOML file or 'k=v ...' (the recipe to audit)",
    )
    ap.add_argument("--epsilons", nargs="+", default=["1", "2", "8", "none"])
    ap.add_argument(
        "--canary-kind",
        nargs="+",
        choices=sorted(AUDITS),
        default=["gradient"],
        help="gradient: Dirac gradient canaries (white box); image: out-of-domain images (decoder and "
        "whole-VAE attacks)",
    )
    ap.add_argument("--silo", type=int, default=1)
    ap.add_argument("--canaries", type=int, default=2000)
    ap.add_argument(
        "--records",
        type=int,
        default=1000,
        help="records of the class beside the canaries (few: each canary weighs more)",
    )
    ap.add_argument("--attack-steps", type=int, default=200, help="image canaries: Adam steps of the decoder attack")
    ap.add_argument("--restarts", type=int, default=4, help="image canaries: restarts of the decoder attack")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/canary-audit")
    args = ap.parse_args(argv)
    base = {**RunConfig().flat(), **parse_config_args([args.run_config])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"{'epsilon':>8} {'accountant':>10} | {'attack':>12} {'lower bound':>11} {'AUC [95% CI]':>22} "
        f"{'TPR@1%FPR [95% CI]':>22} {'TPR@0.1%FPR [95% CI]':>22}",
        flush=True,
    )
    table, broken = [], False
    with progress("canary-audit", len(args.canary_kind) * len(args.epsilons)) as steps:
        for kind, level in ((k, e) for k in args.canary_kind for e in args.epsilons):
            steps.doing(f"{kind} canaries, epsilon {level}")
            with tempfile.TemporaryDirectory(prefix="alignfl-canary-") as tmp:
                epsilon, reports = AUDITS[kind](level_config(base, level), args, Path(tmp))
            steps.advance()
            for attack, report in reports.items():
                name = f"{kind}-{level}" + ("-whole-vae" if attack == "whole VAE" else "")
                (out / f"{name}.json").write_text(report.model_dump_json(indent=1))
                save_audit_plot(report, out / f"{name}.png")
                m, b = report.membership, report.epsilon_bound
                print(
                    f"{level:>8} {epsilon:>10.3f} | {attack:>12} {b.epsilon:>11.3f} {_rate(m.auc, m.auc_ci):>22} "
                    f"{_rate(m.tpr_at_fpr_1e_2, m.tpr_at_fpr_1e_2_ci):>22} "
                    f"{_rate(m.tpr_at_fpr_1e_3, m.tpr_at_fpr_1e_3_ci):>22}",
                    flush=True,
                )
                table.append(
                    {
                        "kind": kind,
                        "level": level,
                        "accountant-epsilon": epsilon,
                        "attack": attack,
                        "lower-bound": b.epsilon,
                        "auc": m.auc,
                        "auc-ci": m.auc_ci,
                        "tpr-at-1pct-fpr": m.tpr_at_fpr_1e_2,
                        "tpr-at-1pct-fpr-ci": m.tpr_at_fpr_1e_2_ci,
                        "tpr-at-0.1pct-fpr": m.tpr_at_fpr_1e_3,
                        "tpr-at-0.1pct-fpr-ci": m.tpr_at_fpr_1e_3_ci,
                        "leakage-auc": report.leakage.membership.auc if report.leakage else None,
                    }
                )
                broken |= b.epsilon > epsilon
            if "decoder" in reports:
                print(
                    f"{'':>8} {'':>10} | hubness-normalised leakage AUC "
                    f"{reports['decoder'].leakage.membership.auc:.3f}",
                    flush=True,
                )
    (out / "table.json").write_text(json.dumps(table, indent=1, default=str))
    if broken:
        print(
            "error: a lower bound exceeds the accountant's epsilon: the accounting or the DP code is wrong",
            file=sys.stderr,
        )
    return 1 if broken else 0


def _rate(value: float | None, ci: tuple[float, float] | None) -> str:
    return "-" if value is None else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
