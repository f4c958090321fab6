"""One silo's side of ALIGN-FL, free of Flower: train the local VAE, hand out only the decoder.

``client_app`` turns a Flower message into a call here and the result back into a reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .audit import audit_outliers, audit_seed, save_audit_figure
from .config import IMAGE_SHAPE, RunConfig, SiloNodeConfig, load_architecture, resolve_data_root
from .data import SiloData, build_silo_data
from .global_model import GlobalModel
from .lipschitz import empirical_lipschitz, upper_bound
from .metrics import peak_rss_mb
from .models import VAE, decoder_only_state
from .privacy import DPPlan, PrivacyLedger, dp_enabled, ledger_path, plan_dp
from .store import GeneratorDescriptor
from .training import set_threads, train_vae, vae_test_loss


@dataclass
class TrainOutcome:
    decoder_state: dict[str, np.ndarray]
    descriptor: GeneratorDescriptor
    vae_state: dict[str, np.ndarray]  # stays on the silo (encoder included)
    metrics: dict[str, float | int]


class Silo:
    """A silo: its data partition, its architecture, its VAE."""

    def __init__(self, cfg: RunConfig, node: SiloNodeConfig) -> None:
        self.cfg, self.node = cfg, node
        self.index = node.partition_id
        self.name = node.silo_name or f"silo-{self.index}"
        self.architecture = load_architecture(node.architecture or cfg.architecture_for(self.index))
        root = resolve_data_root(node.data_root) if node.data_root else cfg.resolved_data_root()
        self.data: SiloData = build_silo_data(cfg, self.index, Path(root), node.class_list)
        set_threads(cfg.client_threads)
        self.dp_plan: DPPlan | None = plan_dp(cfg, len(self.data.x_train)) if dp_enabled(cfg) else None

    def ledger(self) -> PrivacyLedger:
        """The silo's privacy ledger, read from disk each round (another process may have spent budget)."""
        plan = self.dp_plan
        assert plan is not None
        return PrivacyLedger(ledger_path(self.cfg, self.node.privacy_ledger, self.name), self.name, plan.delta,
                             plan.budget_epsilon)

    @property
    def cond_dim(self) -> int:
        return len(self.data.classes) if self.cfg.conditional else 0

    def new_vae(self) -> VAE:
        torch.manual_seed(self.cfg.seed * 7919 + self.index)
        return VAE(self.architecture, self.cond_dim, IMAGE_SHAPE)

    def restore_vae(self, state: dict[str, np.ndarray] | None) -> VAE:
        """The silo's VAE from its previous round (or fresh when absent or from another architecture)."""
        vae = self.new_vae()
        if state:
            expected = vae.state_dict()
            if set(state) == set(expected) and all(tuple(state[k].shape) == tuple(v.shape) for k, v in expected.items()):
                vae.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
        return vae

    def train_round(self, server_round: int, previous_vae: dict[str, np.ndarray] | None) -> TrainOutcome:
        """One round of local training. Private runs book the round in the ledger first
        (``PrivacyBudgetExceeded`` if it would pass the budget) and report only data-free or private numbers."""
        cfg, plan = self.cfg, self.dp_plan
        vae = self.restore_vae(previous_vae)
        ledger = self.ledger() if plan else None
        spent = ledger.reserve(server_round, plan.noise_multiplier, plan.sample_rate, plan.steps_per_round) \
            if ledger and plan else None
        report = train_vae(
            vae, self.data.x_train, self.data.y_train, self.data.classes, epochs=cfg.local_epochs,
            batch_size=cfg.batch_size, lr=cfg.learning_rate, kl_weight=cfg.kl_weight,
            seed=cfg.seed * 100003 + self.index * 1009 + server_round,
            dp_plan=plan, clip_bound=ledger.state.clip_bound if ledger else None, lipschitz=cfg.lipschitz,
            lipschitz_weight=cfg.lipschitz_weight, lipschitz_target=cfg.lipschitz_target,
        )
        desc = GeneratorDescriptor(
            silo=self.name, architecture=self.architecture, conditional=cfg.conditional,
            label_set=self.data.classes, image_shape=IMAGE_SHAPE, round=server_round,
            num_examples=len(self.data.x_train),
        )
        decoder_state = decoder_only_state(vae)
        metrics: dict[str, float | int] = {
            "num-examples": len(self.data.x_train),
            "num-outliers": self.data.num_outliers,
            "train-seconds": report.seconds,
            "samples-per-second": report.examples_seen / max(report.seconds, 1e-9),
            "decoder-bytes": int(sum(a.nbytes for a in decoder_state.values())),
            "peak-rss-mb": peak_rss_mb(),
            "lipschitz-upper-bound": upper_bound(vae.decoder),
            "lipschitz-empirical": empirical_lipschitz(vae.decoder, seed=server_round),
        }
        if report.penalty is not None:
            metrics["lipschitz-penalty"] = report.penalty
        if ledger and plan and spent is not None:
            ledger.state.clip_bound = report.clip_bound
            ledger.save()
            metrics.update({
                "dp-epsilon-spent": spent, "dp-delta": plan.delta, "dp-noise-multiplier": plan.noise_multiplier,
                "dp-sample-rate": plan.sample_rate, "dp-steps": report.steps, "dp-clip-bound": report.clip_bound or 0.0,
                "dp-unclipped-fraction": report.unclipped_fraction or 0.0,
            })
            if plan.budget_epsilon != float("inf"):
                metrics["dp-epsilon-budget"] = plan.budget_epsilon
        else:  # losses on the silo's records are not privatised: sent only without DP
            metrics["train-loss"] = report.loss
            metrics["test-neg-elbo"] = vae_test_loss(vae, self.data.x_test, self.data.y_test, self.data.classes)
        if cfg.audit and server_round == cfg.num_server_rounds and self.data.num_outliers:
            metrics.update(self.audit(vae, server_round))
        vae_state = {k: v.detach().numpy().copy() for k, v in vae.state_dict().items()}
        metrics["vae-bytes"] = int(sum(a.nbytes for a in vae_state.values()))  # what a full-model upload would cost
        return TrainOutcome(decoder_state, desc, vae_state, metrics)

    def train_global_model(self, server_round: int, global_state: dict[str, np.ndarray],
                           proximal_mu: float = 0.0) -> tuple[dict[str, np.ndarray], dict[str, float | int]]:
        """FedAvg / FedProx round: the received global model (``global-model``: the classifier, or the VAE over
        all classes), trained on this silo's real data with the settings the ALIGN-FL silos use for their VAEs
        (outliers included, local-epochs / batch-size / learning-rate)."""
        import time

        cfg = self.cfg
        model = GlobalModel.from_config(cfg)
        model.load_state(global_state)
        t0 = time.perf_counter()
        loss = model.fit(self.data.x_train, self.data.y_train, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                         lr=cfg.learning_rate, seed=cfg.seed * 100003 + self.index * 1009 + server_round,
                         proximal_mu=proximal_mu)
        seconds = time.perf_counter() - t0
        state = model.state()
        metrics: dict[str, float | int] = {
            "num-examples": len(self.data.x_train),
            "num-outliers": self.data.num_outliers,
            "train-loss": loss,
            "train-seconds": seconds,
            "samples-per-second": cfg.local_epochs * len(self.data.x_train) / max(seconds, 1e-9),
            "model-bytes": int(sum(a.nbytes for a in state.values())),
            "peak-rss-mb": peak_rss_mb(),
        }
        return state, metrics

    def audit(self, vae: VAE, server_round: int) -> dict[str, float | int]:
        """The outlier audit (numbers for the reply); its figure shows raw outliers, so it stays on the silo."""
        d = self.data
        result = audit_outliers(vae, d.x_train, d.y_train, d.is_outlier, d.heldout_outliers, d.classes,
                                num_samples=self.cfg.audit_samples, seed=audit_seed(self.cfg.seed, server_round))
        save_audit_figure(vae, d.x_train, d.y_train, d.is_outlier, d.classes,
                          self.cfg.resolved_results_dir() / "silo-audits" / f"{self.name}-round{server_round}.png")
        return result.metrics()

    def evaluate_global(self, kind: str, state: dict[str, np.ndarray]) -> dict[str, float | list[float]]:
        """Judge the global model on this silo's real held-out test set."""
        model = GlobalModel(kind, self.cfg.num_classes, conditional=self.cfg.conditional)
        model.load_state(state)
        return model.evaluate(self.data.x_test, self.data.y_test)
