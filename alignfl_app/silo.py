"""One silo's side of ALIGN-FL, free of Flower: train the local VAE, hand out only the decoder.

``client_app`` turns a Flower message into a call here and the result back into a reply. A round is
composed from the silo's privacy mode (privacy.py: batches, gradient rule, ledger), its Lipschitz hooks
(lipschitz.py) and the shared training loop (training.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .audit import audit_outliers, save_audit_figure
from .config import IMAGE_SHAPE, RunConfig, SiloNodeConfig, load_architecture, resolve_data_root
from .data import SiloData, build_silo_data
from .global_model import GlobalModel
from .lipschitz import lipschitz_hooks
from .metrics import peak_rss_mb
from .models import VAE
from .privacy import privacy_mode
from .replies import AveragedTrainMetrics, EvaluateMetrics, GeneratorTrainMetrics
from .seeds import audit_seed, local_batches_seed, vae_init_seed
from .store import GeneratorDescriptor
from .training import (HeldOutLoss, NegativeELBO, ProximalTerm, ShuffledBatches, Trainer, set_threads,
                       to_local_labels)

StateDict = dict[str, torch.Tensor]


@dataclass
class TrainOutcome:
    decoder_state: StateDict
    descriptor: GeneratorDescriptor
    vae_state: StateDict  # stays on the silo (encoder included)
    metrics: GeneratorTrainMetrics


class Silo:
    """A silo: its data partition, its architecture, its privacy mode, its VAE."""

    def __init__(self, cfg: RunConfig, node: SiloNodeConfig) -> None:
        self.cfg = cfg
        self.index = node.partition_id
        self.name = node.name
        self.dir = node.resolved_silo_dir()
        self.architecture = load_architecture(node.architecture or cfg.local.architecture_for(self.index))
        root = resolve_data_root(node.data_root or cfg.data.data_root)
        self.data: SiloData = build_silo_data(cfg, self.index, root, node.classes)
        set_threads(cfg.local.client_threads)
        self.privacy = privacy_mode(cfg, len(self.data.x_train), node.privacy_ledger, self.name)
        self.cond_dim = len(self.data.classes) if cfg.local.conditional else 0
        self.y_train = self._decoder_labels(self.data.y_train)
        self.y_test = self._decoder_labels(self.data.y_test)

    def _decoder_labels(self, y: torch.Tensor) -> torch.Tensor:
        """The decoder's condition: index in the silo's label set (all zero for an unconditional decoder)."""
        return to_local_labels(y, self.data.classes) if self.cond_dim else torch.zeros(len(y), dtype=torch.long)

    def new_vae(self) -> VAE:
        torch.manual_seed(vae_init_seed(self.cfg.run.seed, self.index))
        return VAE(self.architecture, self.cond_dim, IMAGE_SHAPE)

    def restore_vae(self, state: StateDict | None) -> VAE:
        """The silo's VAE from its previous round (or fresh when absent or from another architecture)."""
        vae = self.new_vae()
        if state:
            expected = vae.state_dict()
            if set(state) == set(expected) and all(state[k].shape == v.shape for k, v in expected.items()):
                vae.load_state_dict(state)
        return vae

    def train_round(self, server_round: int, previous_vae: StateDict | None) -> TrainOutcome:
        """One round of local training under the silo's privacy mode (a DP silo books the round first and
        raises ``PrivacyBudgetExceeded`` if it would pass the budget); only data-free or private numbers
        leave a DP silo."""
        cfg, privacy, data = self.cfg, self.privacy, self.data
        vae = self.restore_vae(previous_vae)
        optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.local.learning_rate)
        generator = privacy.generator(local_batches_seed(cfg.run.seed, self.index, server_round))
        rule = privacy.open_round(server_round, vae)
        batches = privacy.batcher()(len(data.x_train), generator)
        hooks = lipschitz_hooks(cfg.lipschitz, vae.decoder, cfg.local.batch_size, generator, measure_seed=server_round)
        if privacy.releases_record_losses:
            hooks.append(HeldOutLoss(vae, (data.x_test, self.y_test)))
        report = Trainer(NegativeELBO(cfg.local.kl_weight), rule, hooks).fit(
            vae, (data.x_train, self.y_train), batches, optimizer)
        decoder_state = {k: v.detach().clone() for k, v in vae.decoder.state_dict().items()}
        vae_state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
        metrics: dict[str, float | int] = {
            "num-examples": len(data.x_train),
            "num-outliers": data.num_outliers,
            "train-seconds": report.seconds,
            "samples-per-second": report.examples_seen / max(report.seconds, 1e-9),
            "decoder-bytes": state_bytes(decoder_state),
            "vae-bytes": state_bytes(vae_state),  # what a full-model upload would cost
            "peak-rss-mb": peak_rss_mb(),
            **report.details,
        }
        if privacy.releases_record_losses:
            metrics["train-loss"] = report.loss
        if cfg.privacy.audit and server_round == cfg.run.num_server_rounds and data.num_outliers:
            metrics.update(self.audit(vae, server_round))
        desc = GeneratorDescriptor(
            silo=self.name, architecture=self.architecture, conditional=cfg.local.conditional,
            label_set=data.classes, image_shape=IMAGE_SHAPE, round=server_round, num_examples=len(data.x_train),
        )
        return TrainOutcome(decoder_state, desc, vae_state, GeneratorTrainMetrics.model_validate(metrics))

    def train_global_model(self, server_round: int, global_state: StateDict,
                           proximal_mu: float = 0.0) -> tuple[StateDict, AveragedTrainMetrics]:
        """FedAvg / FedProx round: the received global model (``global-model``: the classifier, or the VAE over
        all classes), trained on this silo's real data with the settings the ALIGN-FL silos use for their VAEs
        (outliers included, local-epochs / batch-size / learning-rate)."""
        cfg = self.cfg
        model = GlobalModel.from_config(cfg)
        model.load_state(global_state)
        hooks = [ProximalTerm(model.model, proximal_mu)] if proximal_mu > 0 else []
        batches = ShuffledBatches(cfg.local.batch_size, cfg.local.local_epochs)
        generator = torch.Generator().manual_seed(local_batches_seed(cfg.run.seed, self.index, server_round))
        report = model.fit((self.data.x_train, self.data.y_train), batches(len(self.data.x_train), generator),
                           cfg.local.learning_rate, hooks)
        state = model.state()
        return state, AveragedTrainMetrics(
            num_examples=len(self.data.x_train), num_outliers=self.data.num_outliers, train_loss=report.loss,
            train_seconds=report.seconds, samples_per_second=report.examples_seen / max(report.seconds, 1e-9),
            model_bytes=state_bytes(state), peak_rss_mb=peak_rss_mb())

    def audit(self, vae: VAE, server_round: int) -> dict[str, float | int]:
        """The outlier audit (numbers for the reply); its figure shows raw outliers, so it stays in the silo's
        own folder."""
        d = self.data
        result = audit_outliers(vae, d.x_train, d.y_train, d.is_outlier, d.heldout_outliers, d.classes,
                                num_samples=self.cfg.privacy.audit_samples,
                                seed=audit_seed(self.cfg.run.seed, server_round))
        save_audit_figure(vae, d.x_train, d.y_train, d.is_outlier, d.classes,
                          self.dir / "audits" / f"round-{server_round:03d}.png")
        return result.metrics()

    def evaluate_global(self, kind: str, state: StateDict) -> EvaluateMetrics:
        """Judge the global model on this silo's real held-out test set."""
        model = GlobalModel(kind, self.cfg.data.num_classes, conditional=self.cfg.local.conditional)
        model.load_state(state)
        return EvaluateMetrics.model_validate({**model.evaluate(self.data.x_test, self.data.y_test),
                                               "silo-index": self.index})


def state_bytes(state: StateDict) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))
