"""One silo's side of ALIGN-FL, free of Flower: train the local generators, hand out only the decoder.

``client_app`` turns a Flower message into a call here and the result back into a reply. A round is
composed from the silo's privacy (privacy.py: what the run asks, held against the silo's own policy; batches,
gradient rule, ledger), its Lipschitz hooks (lipschitz.py) and the shared training loop (training.py), once per
generator group: the silo's one VAE, or one VAE per class (``generator-layout='per-class'``).

Under DP only the decoder and public constants leave the silo; every figure computed from its records (counts,
losses, timings, the outlier audit) goes to the silo's own report, ``<silo-dir>/reports/round-NNN.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass

import torch

from alignfl_app.audit.outliers import audit_outliers, save_audit_figure
from alignfl_app.config import RunConfig, SiloNodeConfig, load_architecture, resolve_data_root
from alignfl_app.contract.descriptor import GeneratorDescriptor
from alignfl_app.contract.replies import (
    AveragedTrainMetrics,
    EvaluateMetrics,
    GeneratorTrainMetrics,
    PrivateTrainMetrics,
)
from alignfl_app.contract.sampling import SamplingStyle
from alignfl_app.data.datasets import SiloData, build_silo_data
from alignfl_app.devices import on_cpu, peak_rss_mb, resolve_device, tensors_to
from alignfl_app.files import atomic_write_text
from alignfl_app.models.families import check_family_fits_run, family_of
from alignfl_app.models.families.gaussian import GaussianDecoder, fit_class_mixtures
from alignfl_app.models.features import FeatureSpace
from alignfl_app.models.global_model import GlobalModel
from alignfl_app.models.latents import LatentFit, MixtureFit
from alignfl_app.models.lipschitz import lipschitz_hooks
from alignfl_app.models.vae import GeneratorSet, LatentFitter, build_decoder
from alignfl_app.privacy.admission import admit, requires_dp
from alignfl_app.privacy.dpsgd import DifferentialPrivacy, DPCarry, NoPrivacy
from alignfl_app.privacy.errors import PrivacyRefusal
from alignfl_app.privacy.ledger import LedgerAnchor
from alignfl_app.privacy.policy import load_silo_policy
from alignfl_app.seeds import audit_seed, fidelity_seed, latent_fit_seed, local_batches_seed, vae_init_seed
from alignfl_app.silo.fidelity import LabelFidelity
from alignfl_app.silo.folder import AUDITS_DIR, FAILURES_LOG, REPORTS_DIR
from alignfl_app.silo.state import SiloStateStore, StateIdentity, StoredState
from alignfl_app.training import (
    HeldOutLoss,
    NegativeELBO,
    ProximalTerm,
    ShuffledBatches,
    Trainer,
    TrainReport,
    set_threads,
    to_local_labels,
)

StateDict = dict[str, torch.Tensor]
Tensors = tuple[torch.Tensor, torch.Tensor]
log = logging.getLogger("flwr.alignfl")


@dataclass(frozen=True)
class GeneratorGroup:
    """Records one VAE trains on: (images, decoder condition) for training and held-out evaluation."""

    train: Tensors
    test: Tensors


@dataclass
class SiloState:
    """What a silo carries from one round to the next (never sent): its VAEs (encoders included), each generator
    group's optimizer state (Adam's moments carry over: a restart must not reset them), its DP carry."""

    generators: StateDict | None = None
    dp: DPCarry | None = None
    optimizers: list[dict] | None = None
    ledger: LedgerAnchor | None = None  # the privacy ledger after a private round (recorded outside it)


@dataclass
class TrainOutcome:
    decoder_state: StateDict
    descriptor: GeneratorDescriptor
    state: SiloState  # stays on the silo
    metrics: GeneratorTrainMetrics | PrivateTrainMetrics


class Silo:
    """A silo: its data partition, its architecture, its generator groups, its privacy policy."""

    def __init__(self, cfg: RunConfig, node: SiloNodeConfig) -> None:
        self.cfg = cfg
        self.index = node.partition_id
        self.name = node.name  # the silo's own (silo_setup.py): the run config never renames or re-homes it
        self.dir = node.resolved_silo_dir()
        self.architecture = load_architecture(node.architecture or cfg.local.architecture_for(self.index))
        self.architecture.check_fits(cfg.data.image_shape)
        self.family = family_of(self.architecture.kind)
        check_family_fits_run(self.architecture, cfg)
        self.device = resolve_device(node.client_device or cfg.local.client_device, "client-device")
        root = resolve_data_root(node.data_root or "")
        classes = cfg.data.class_ids(node.classes) if node.classes is not None else None
        self.data: SiloData = tensors_to(
            build_silo_data(cfg, self.index, root, classes, node.resolved_data_dir()), self.device
        )
        set_threads(cfg.local.client_threads)
        self.layout = cfg.local.generator_layout if cfg.local.conditional else "unconditional"
        self.groups = self.generator_groups()
        self.feature_space = FeatureSpace(cfg.features.spec, cfg.data.image_shape).to(self.device)

    @functools.cached_property
    def train_features(self) -> torch.Tensor:
        """The training records in the run's feature space (computed once: the transform is fixed)."""
        return self.feature_space(self.data.x_train)

    def generator_groups(self) -> list[GeneratorGroup]:
        """One group per class (per-class layout), else one group holding every record; each record's decoder
        condition is its index in the silo's classes (conditional) or 0 (one decoder per group)."""
        d = self.data
        if self.layout == "per-class":
            return [
                GeneratorGroup(_unconditional(d.x_train[d.y_train == c]), _unconditional(d.x_test[d.y_test == c]))
                for c in d.classes
            ]
        if self.layout == "conditional":
            return [
                GeneratorGroup(
                    (d.x_train, to_local_labels(d.y_train, d.classes)), (d.x_test, to_local_labels(d.y_test, d.classes))
                )
            ]
        return [GeneratorGroup(_unconditional(d.x_train), _unconditional(d.x_test))]

    def privacy(self) -> NoPrivacy | DifferentialPrivacy:
        """What the run asks, if this silo's policy (read each time: its operator may change it) allows it."""
        return admit(
            self.cfg.privacy,
            load_silo_policy(self.dir),
            self.cfg.run.num_server_rounds,
            self.name,
            self.dir,
            self.cfg.local,
        )

    def new_generators(self) -> GeneratorSet:
        torch.manual_seed(vae_init_seed(self.cfg.run.seed, self.index))
        generators = GeneratorSet(self.architecture, self.layout, len(self.data.classes), self.cfg.data.image_shape)
        return generators.to(self.device)  # initialised on the CPU: the same weights on every device

    def restore_generators(self, state: StateDict | None) -> tuple[GeneratorSet, bool]:
        """The silo's VAEs from its previous round (or fresh when absent or from another architecture); whether
        they were restored."""
        generators = self.new_generators()
        if state:
            expected = generators.state_dict()
            if set(state) == set(expected) and all(state[k].shape == v.shape for k, v in expected.items()):
                generators.load_state_dict(state)
                return generators, True
        return generators, False

    def identity(self) -> StateIdentity:
        """What the silo's stored state must match to be continued."""
        return StateIdentity(
            architecture=self.architecture.model_dump(mode="json"),
            layout=self.layout,
            image_shape=tuple(self.cfg.data.image_shape),
            classes=tuple(self.data.classes),
        )

    def state_store(self, run: str, flower_run: str = "") -> SiloStateStore:
        return SiloStateStore(self.dir, run, self.name, flower_run)

    def continue_round(self, run: str, server_round: int, flower_run: str = "") -> TrainOutcome:
        """A train request: restore the run's state from the silo's own folder (fresh when absent or from another
        setup; ``SiloStateError`` when unusable), train the round, store its state before replying.

        The privacy ledger books the round under the Flower run that started this run (``flower_run``, or for a
        resumed run the one its stored state names): a resumed run continues its own budget, and a new run that
        reuses a run-name is a new run for the ledger too."""
        store, identity = self.state_store(run, flower_run), self.identity()
        stored = store.load(identity, resuming=self.cfg.run.resume)
        previous, origin = None, flower_run or run
        if stored is not None:
            if stored.round >= server_round:
                log.info(
                    "Silo '%s': asked for round %d, its stored state is from round %d (a resumed server); it "
                    "continues from that state",
                    self.name,
                    server_round,
                    stored.round,
                )
            previous = SiloState(stored.generators, stored.dp, stored.optimizers)
            origin = stored.origin or origin
        out = self.train_round(origin, server_round, previous)
        store.save(
            server_round,
            identity,
            StoredState(
                server_round, out.state.generators, out.state.optimizers or [], out.state.dp, origin, out.state.ledger
            ),
        )
        return out

    def train_round(self, run: str, server_round: int, previous: SiloState | None = None) -> TrainOutcome:
        """One round of local training under the silo's privacy (``PrivacyRefusal`` if its policy or ledger
        refuses: a DP silo books the round before it trains)."""
        cfg, previous = self.cfg, previous or SiloState()
        privacy = self.privacy()
        if self.family.encoder is None:
            return self.fit_round(server_round)
        generators, restored = self.restore_generators(previous.generators)
        saved_optimizers = previous.optimizers if restored and previous.optimizers else []
        session = privacy.open_round(run, server_round, [len(g.train[0]) for g in self.groups], previous.dp)
        optimizers = []
        reports = []
        for i, (group, vae) in enumerate(zip(self.groups, generators.vaes, strict=True)):
            tags = (i,) if self.layout == "per-class" else ()
            seed = local_batches_seed(cfg.run.seed, self.index, server_round, *tags)
            generator = torch.Generator().manual_seed(seed)
            hooks = lipschitz_hooks(
                cfg.lipschitz, vae.decoder, cfg.local.batch_size, generator, measure_seed=server_round
            )
            if privacy.releases_record_figures:
                hooks.append(HeldOutLoss(vae, group.test))
            optimizer = self.optimizer(
                vae, session.learning_rate, saved_optimizers[i] if len(saved_optimizers) == len(self.groups) else None
            )
            optimizers.append(optimizer)
            reports.append(
                Trainer(NegativeELBO(cfg.local.kl_weight), session.rule(i, vae), hooks).fit(
                    vae, group.train, session.batches(i, len(group.train[0]), seed), optimizer
                )
            )
        fitter = self.latent_fitter(server_round)
        if fitter is not None and privacy.releases_record_figures:
            generators.fit_latents([group.train for group in self.groups], fitter)
        released = generators.decoder
        decoder_state = on_cpu(released.state_dict())
        state = SiloState(
            on_cpu(generators.state_dict()),
            session.carry(),
            [optimizer_on_cpu(o.state_dict()) for o in optimizers],
            session.ledger_anchor,
        )
        desc = GeneratorDescriptor(
            silo=self.name,
            architecture=self.architecture,
            layout=self.layout,
            image_shape=self.cfg.data.image_shape,
            classes=tuple(cfg.data.class_names[c] for c in self.data.classes),
            round=server_round,
            latent_components=generators.latent_components,
        )
        figures = self.record_figures(reports, decoder_state, state.generators)
        if cfg.local.label_fidelity_samples and privacy.releases_record_figures:
            figures["label-fidelity"] = self.label_fidelity(desc, released, server_round)
        if cfg.privacy.audit and server_round == cfg.run.num_server_rounds and self.data.num_outliers:
            figures.update(self.audit(generators, server_round))
        if privacy.releases_record_figures:
            metrics = GeneratorTrainMetrics.model_validate(figures)
        else:
            self.write_report(server_round, {**figures, **session.public_report(), **session.ledger_anchor.report()})
            metrics = PrivateTrainMetrics.model_validate(
                {**session.public_report(), "decoder-bytes": state_bytes(decoder_state)}
            )
        return TrainOutcome(decoder_state, desc, state, metrics)

    def fit_round(self, server_round: int) -> TrainOutcome:
        """A closed-form family's round (no DP: ``check_family_fits_run``): its generator fitted to the features of
        the silo's records, one mixture per class."""
        t0 = time.perf_counter()
        d = self.data
        local = to_local_labels(d.y_train, d.classes)
        k = len(d.classes)
        decoder = build_decoder(self.architecture, self.layout, k, self.feature_space.out_shape).to(self.device)
        if self.layout == "per-class":
            parts = [
                (self.train_features[local == c], torch.zeros(int((local == c).sum()), dtype=torch.long))
                for c in range(k)
            ]
            fit_class_mixtures(
                list(decoder.decoders), parts, latent_fit_seed(self.cfg.run.seed, self.index, server_round)
            )
        else:
            rows = local if self.layout == "conditional" else torch.zeros_like(local)
            fit_class_mixtures(
                [decoder], [(self.train_features, rows)], latent_fit_seed(self.cfg.run.seed, self.index, server_round)
            )
        decoder_state = on_cpu(decoder.state_dict())
        seconds = time.perf_counter() - t0
        slope = max(m.slope() for m in decoder.modules() if isinstance(m, GaussianDecoder))
        desc = GeneratorDescriptor(
            silo=self.name,
            architecture=self.architecture,
            layout=self.layout,
            image_shape=self.cfg.data.image_shape,
            classes=tuple(self.cfg.data.class_names[c] for c in d.classes),
            round=server_round,
            features=self.cfg.features.spec,
        )
        metrics = GeneratorTrainMetrics.model_validate(
            {
                "num-examples": len(d.x_train),
                "num-outliers": d.num_outliers,
                "train-seconds": seconds,
                "samples-per-second": len(d.x_train) / max(seconds, 1e-9),
                "decoder-bytes": state_bytes(decoder_state),
                "vae-bytes": state_bytes(decoder_state),
                "peak-rss-mb": peak_rss_mb(),
                "lipschitz-upper-bound": slope,
                "lipschitz-empirical": slope,
            }
        )
        return TrainOutcome(decoder_state, desc, SiloState(decoder_state), metrics)

    def latent_fitter(self, server_round: int) -> LatentFitter | None:
        """How this round's released decoders fit their latent codes (``latent-fit``), None: not at all."""
        local = self.cfg.local
        if local.latent_fit == "gaussian":
            return LatentFit.of
        if local.latent_fit == "mixture":
            seed = latent_fit_seed(self.cfg.run.seed, self.index, server_round)
            return functools.partial(MixtureFit.of, components=local.latent_components, seed=seed)
        return None

    @staticmethod
    def optimizer(vae: torch.nn.Module, learning_rate: float, saved: dict | None) -> torch.optim.Adam:
        """The group's Adam, with its moments from the previous round when they fit; the run's learning rate."""
        optimizer = torch.optim.Adam(vae.parameters(), lr=learning_rate)
        if saved:
            try:
                optimizer.load_state_dict(saved)
            except (ValueError, KeyError):
                optimizer = torch.optim.Adam(vae.parameters(), lr=learning_rate)  # another shape: fresh moments
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
        return optimizer

    def record_figures(
        self, reports: list[TrainReport], decoder_state: StateDict, vae_state: StateDict
    ) -> dict[str, float | int]:
        """The round's figures over every group: counts, costs, losses, the decoders' Lipschitz numbers."""
        seen = sum(r.examples_seen for r in reports)
        seconds = sum(r.seconds for r in reports)
        figures: dict[str, float | int] = {
            "num-examples": len(self.data.x_train),
            "num-outliers": self.data.num_outliers,
            "train-seconds": seconds,
            "samples-per-second": seen / max(seconds, 1e-9),
            "decoder-bytes": state_bytes(decoder_state),
            "vae-bytes": state_bytes(vae_state),
            "peak-rss-mb": peak_rss_mb(),
            "train-loss": sum(r.loss * r.examples_seen for r in reports) / max(seen, 1),
        }
        for key in ("lipschitz-upper-bound", "lipschitz-empirical", "dp-clip-bound"):  # the worst group
            values = [r.details[key] for r in reports if key in r.details]
            if values:
                figures[key] = max(values)
        sizes = [len(g.test[0]) for g in self.groups]
        for key in ("lipschitz-penalty", "test-neg-elbo", "dp-unclipped-fraction"):  # weighted by held-out size
            pairs = [(r.details[key], n) for r, n in zip(reports, sizes, strict=True) if key in r.details]
            if pairs:
                figures[key] = sum(v * n for v, n in pairs) / max(sum(n for _, n in pairs), 1)
        return figures

    def write_report(self, server_round: int, figures: dict) -> None:
        """The silo's own record of a private round (never sent): figures computed from its records, and the
        ledger's anchor after the round."""
        path = self.dir / REPORTS_DIR / f"round-{server_round:03d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(figures, indent=1, sort_keys=True))
        # only the path: a simulation's ClientApp log is uploaded to the SuperLink
        log.info("Silo '%s': round %d's figures are in its own report %s", self.name, server_round, path)

    def record_failure(self, server_round: int, text: str) -> None:
        """A failed private round's traceback, kept on the silo (its text may describe the records)."""
        path = self.dir / REPORTS_DIR / FAILURES_LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"round {server_round}\n{text}\n")

    def train_global_model(
        self, server_round: int, global_state: StateDict, proximal_mu: float = 0.0
    ) -> tuple[StateDict, AveragedTrainMetrics]:
        """FedAvg / FedProx round: the received global model (``global-model``: the classifier, or the VAE over
        all classes), trained on this silo's real data with the settings the ALIGN-FL silos use for their VAEs
        (outliers included, local-epochs / batch-size / learning-rate)."""
        cfg = self.cfg
        self.refuse_non_private_release("trains weight averaging without DP")
        model = GlobalModel.from_config(cfg, self.device)
        model.load_state(global_state)
        hooks = [ProximalTerm(model.model, proximal_mu)] if proximal_mu > 0 else []
        batches = ShuffledBatches(cfg.local.batch_size, cfg.local.local_epochs)
        generator = torch.Generator().manual_seed(local_batches_seed(cfg.run.seed, self.index, server_round))
        report = model.fit(
            (self.train_features, self.data.y_train),
            batches(len(self.data.x_train), generator),
            cfg.local.learning_rate,
            hooks,
        )
        state = model.state()
        return state, AveragedTrainMetrics(
            num_examples=len(self.data.x_train),
            num_outliers=self.data.num_outliers,
            train_loss=report.loss,
            train_seconds=report.seconds,
            samples_per_second=report.examples_seen / max(report.seconds, 1e-9),
            model_bytes=state_bytes(state),
            peak_rss_mb=peak_rss_mb(),
        )

    def label_fidelity(self, desc: GeneratorDescriptor, decoder: torch.nn.Module, server_round: int) -> float | None:
        """The released decoder's label fidelity, judged on the silo's training records, drawn in the server's
        sampling style."""
        d, c = self.data, self.cfg
        return LabelFidelity(c.local.label_fidelity_samples).measure(
            desc,
            decoder,
            (d.x_train, to_local_labels(d.y_train, d.classes)),
            SamplingStyle.of(c.server),
            fidelity_seed(c.run.seed, self.index, server_round),
        )

    def audit(self, generators: GeneratorSet, server_round: int) -> dict[str, float | int]:
        """The outlier audit; its figure shows raw outliers, so it stays in the silo's own folder."""
        d = self.data
        result = audit_outliers(
            generators,
            d.x_train,
            d.y_train,
            d.is_outlier,
            d.heldout_outliers,
            d.classes,
            num_samples=self.cfg.privacy.audit_samples,
            seed=audit_seed(self.cfg.run.seed, server_round),
        )
        save_audit_figure(
            generators,
            d.x_train,
            d.y_train,
            d.is_outlier,
            d.classes,
            self.dir / AUDITS_DIR / f"round-{server_round:03d}.png",
        )
        return result.metrics()

    def refuse_non_private_release(self, what: str) -> None:
        """PrivacyRefusal when the run asks for DP or the silo requires it: ``what`` would release figures of its
        records without DP."""
        if self.cfg.privacy.enabled or requires_dp(load_silo_policy(self.dir), self.dir, self.name):
            raise PrivacyRefusal(f"silo '{self.name}' trains under DP: it {what}")

    def evaluate_global(self, kind: str, state: StateDict) -> EvaluateMetrics:
        """Judge the global model on this silo's real held-out test set; a silo under DP does not release it."""
        self.refuse_non_private_release(
            "does not release evaluations on its records (evaluate on the server's test set)"
        )
        model = GlobalModel(
            kind,
            self.cfg.data.num_classes,
            conditional=self.cfg.local.conditional,
            device=self.device,
            image_shape=self.cfg.data.image_shape,
            features=self.cfg.features.spec,
        )
        model.load_state(state)
        figures = model.evaluate(self.data.x_test, self.data.y_test)
        figures.pop("balanced-accuracy", None)  # the server derives it from the per-class figures
        return EvaluateMetrics.model_validate({**figures, "silo-index": self.index})


def _unconditional(x: torch.Tensor) -> Tensors:
    """Images with the condition of an unconditional decoder (all 0)."""
    return x, torch.zeros(len(x), dtype=torch.long, device=x.device)


def optimizer_on_cpu(state: dict) -> dict:
    """An optimizer's state dict with CPU tensors (what is stored is a CPU copy)."""
    return {
        "state": {
            k: {n: v.detach().cpu().clone() if torch.is_tensor(v) else v for n, v in s.items()}
            for k, s in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }


def state_bytes(state: StateDict) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))
