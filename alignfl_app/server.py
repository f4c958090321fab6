"""The server's side of ALIGN-FL, free of Flower: who serves which silo, which generators are kept, and the
global model learned from their samples.

``server_app`` turns Flower messages into ``TrainReply`` objects and calls ``AlignFLServer``; everything
that decides (reply checks, silo binding, storing, synthesis, the global model's schedule and seeds) is here.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoint
from .config import ConfigError, RunConfig
from .global_model import GlobalModel
from .metrics import RunRecorder, peak_rss_mb
from .replies import ReplyRejected, train_metrics_schema
from .augment import SyntheticAugmentation
from .seeds import augment_seed, server_batches_seed, server_training_seed, synthesis_seed
from .store import GeneratorStore, GeneratorTerms, check_decoder_state, parse_descriptor
from .synthesis import SyntheticBudget, sample_generator, synthesize
from .training import ShuffledBatches, set_threads

log = logging.getLogger("flwr.alignfl")  # printed by Flower's log handler, beside its own lines


class SilosRefused(ConfigError):
    """No silo will train under the run's request; the message names each silo's reason (and ledger)."""


@dataclass
class TrainReply:
    """What a silo's train reply holds, taken out of its message but not yet trusted."""

    descriptor_json: str
    decoder: dict[str, np.ndarray]
    metrics: dict[str, Any]
    nbytes: int


@dataclass
class SiloRegistry:
    """Which node serves which silo. A name moves to another node only when its node was not asked to train
    in that round (e.g. a resumed simulation, whose nodes get new ids); nothing changes unless every check passes."""

    silo_of_node: dict[int, str] = field(default_factory=dict)
    asked: dict[int, list[int]] = field(default_factory=dict)  # round -> nodes asked to train

    def name_of(self, node: int) -> str | None:
        return self.silo_of_node.get(node)

    def check(self, server_round: int, node: int, silo: str) -> int | None:
        """Raise ReplyRejected if ``node`` may not serve ``silo``; return the node whose binding it takes over."""
        current = self.silo_of_node.get(node, silo)
        if current != silo:
            raise ReplyRejected(f"node switched silo name from '{current}' to '{silo}'")
        owner = next((n for n, s in self.silo_of_node.items() if s == silo and n != node), None)
        if owner is not None and not self.gone(owner, server_round):
            raise ReplyRejected(f"silo name '{silo}' is already served by node {owner}")
        return owner

    def bind(self, node: int, silo: str, previous_owner: int | None) -> None:
        if previous_owner is not None:
            log.warning("Silo '%s' is now served by node %d (node %d is no longer connected)", silo, node,
                        previous_owner)
            del self.silo_of_node[previous_owner]
        self.silo_of_node[node] = silo

    def gone(self, node: int, server_round: int) -> bool:
        """True when ``node`` was not connected when this round's train instructions went out."""
        return server_round in self.asked and node not in self.asked[server_round]


class GlobalLearner:
    """Trains the global model on fresh synthetic samples every server epoch, with a cosine learning-rate
    schedule over the whole run's server epochs (a stable final model); resumable at any round."""

    FLOOR = 0.01  # the schedule ends at 1% of server-learning-rate

    def __init__(self, cfg: RunConfig, model: GlobalModel, terms: GeneratorTerms) -> None:
        self.cfg, self.model, self.terms = cfg, model, terms
        self.augment = SyntheticAugmentation(cfg.server.augment)
        self.budget = SyntheticBudget(cfg.server.synthetic_per_silo, cfg.server.synthetic_total)
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None

    def cosine_factor(self, step: int) -> float:
        total = self.cfg.run.num_server_rounds * self.cfg.server.epochs
        frac = min(max(step / max(total, 1), 0.0), 1.0)
        return self.FLOOR + (1 - self.FLOOR) * 0.5 * (1 + math.cos(math.pi * frac))

    def _schedule(self, step: int) -> torch.optim.lr_scheduler.LambdaLR:
        """The schedule positioned at ``step`` (a resumed run, or a round without generators, jumps ahead)."""
        if self.scheduler is None or self.scheduler.last_epoch != step:
            optimizer = self.model.optimizer_for(self.cfg.server.learning_rate)
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", self.cfg.server.learning_rate)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.cosine_factor, last_epoch=step - 1)
        return self.scheduler

    def learn(self, store: GeneratorStore, server_round: int) -> dict[str, float]:
        c = self.cfg
        set_threads(c.server.threads)
        t0 = time.perf_counter()
        loss, n = float("nan"), 0
        for epoch in range(c.server.epochs):
            schedule = self._schedule((server_round - 1) * c.server.epochs + epoch)
            x, y, _ = synthesize(store, self.terms, self.budget, c.server.sample_temperature,
                                 seed=lambda i, e=epoch: synthesis_seed(c.run.seed, server_round, e, i),
                                 device=self.model.device)
            x = self.augment(x, augment_seed(c.run.seed, server_round, epoch))
            n += len(x)
            generator = torch.Generator().manual_seed(server_batches_seed(c.run.seed, server_round, epoch))
            torch.manual_seed(server_training_seed(c.run.seed, server_round, epoch))
            report = self.model.fit((x, y), ShuffledBatches(c.server.batch_size, 1)(len(x), generator),
                                    c.server.learning_rate)
            loss = report.loss
            schedule.step()
        seconds = time.perf_counter() - t0
        log.info("Global %s trained on %d synthetic samples from %d generators in %.1fs (loss %.4f)",
                 c.server.global_model, n, len(store), seconds, loss)
        return {"server-train-loss": loss, "synthetic-samples": n, "server-seconds": seconds,
                "server-peak-rss-mb": peak_rss_mb()}


class AlignFLServer:
    """Keeps every silo's latest good generator and learns the global model from their samples."""

    def __init__(self, cfg: RunConfig, store: GeneratorStore, model: GlobalModel, recorder: RunRecorder) -> None:
        self.cfg, self.store, self.model, self.recorder = cfg, store, model, recorder
        self.registry = SiloRegistry()
        self.terms = GeneratorTerms.from_config(cfg)
        self.learner = GlobalLearner(cfg, model, self.terms)
        self.train_schema = train_metrics_schema(cfg.privacy.enabled)

    def first_round(self, checkpoint: Checkpoint) -> int:
        """The first round to run: 1, or (resume) one past the checkpoint, whose state is loaded here."""
        cfg = self.cfg
        if not cfg.run.resume:
            if checkpoint.exists() or len(self.store):
                raise ConfigError(f"run-name '{cfg.run.run_name}' already holds a run ({checkpoint.dir.parent}): "
                                  "set resume=true to continue it, or choose another run-name")
            return 1
        state = checkpoint.load()
        checkpoint.check_compatible(state, cfg)
        self.model.load_state(checkpoint.load_model(state))
        self.registry.silo_of_node = {int(k): v for k, v in state.silo_of_node.items()}
        self.recorder.resume(state.completed_round)
        log.info("Resuming after round %d: global model from the checkpoint, %d stored generators %s",
                 state.completed_round, len(self.store), self.store.silos())
        return state.completed_round + 1

    def save_checkpoint(self, checkpoint: Checkpoint, completed_round: int) -> None:
        checkpoint.save(completed_round, self.model.state(), self.registry.silo_of_node, self.cfg)

    def accept(self, server_round: int, node: int, reply: TrainReply) -> str:
        """Check a reply and store its generator; ReplyRejected (one line) leaves every state as it was."""
        desc = parse_descriptor(reply.descriptor_json)
        check_decoder_state(desc, reply.decoder, self.terms)
        metrics = self.train_schema.received(reply.metrics).record()
        previous_owner = self.registry.check(server_round, node, desc.silo)
        self.store.put(desc, reply.decoder, server_round)
        self.registry.bind(node, desc.silo, previous_owner)
        self.recorder.silo(server_round, desc.silo).update(
            {**metrics, "bytes-up": reply.nbytes, "bytes-down-train": 0,
             "architecture": desc.architecture.name, "layout": desc.layout, "classes": list(desc.classes)})
        return desc.silo

    def finish_train_round(self, server_round: int, accepted: int, rejected: list[str], replied: set[int],
                           refused: list[str] | None = None) -> dict[str, float] | None:
        """Record the round; train the global model on samples from every stored generator (None: none yet).

        ``refused``: the silos' own refusals (privacy policy or ledger). When every silo asked refused, no silo
        can train any more: the run stops, naming them."""
        refused = refused or []
        for reason in rejected:
            log.warning("Rejected train reply from %s", reason)
        for reason in refused:
            log.warning("Refused by the silo: %s", reason)
        asked = self.registry.asked.get(server_round, [])
        if refused and accepted == 0 and not rejected and len(refused) >= len(asked):
            self.recorder.round(server_round).update({"refused": refused})
            self.recorder.write()
            raise SilosRefused("every silo refused to train, so the run stops: " + " | ".join(refused))
        missing = [self.registry.name_of(n) or f"node-{n}" for n in self.registry.asked.get(server_round, [])
                   if n not in replied]
        if missing:
            log.warning("No train reply within round-timeout from %s (silo died or timed out); the round goes on",
                        missing)
        stale = [s for s in self.store.silos() if self.store.entry(s)["stored_round"] != server_round]
        if stale:
            log.info("Silos without a new generator this round (their stored one is used): %s", stale)
        rnd = self.recorder.round(server_round)
        rnd.update({"accepted-replies": accepted, "rejected-replies": rejected, "refused": refused,
                    "missing-replies": missing,
                    "stale-silos": stale, "generators-used": self.store.silos()})
        if len(self.store) == 0:
            log.warning("No generator stored yet; the global model is unchanged")
            self.recorder.write()
            return None
        metrics = self.learner.learn(self.store, server_round)
        self.save_sample_grid(server_round)
        rnd["server"] = metrics
        self.recorder.write()
        return metrics

    def save_sample_grid(self, server_round: int) -> None:
        c = self.cfg.server
        if not c.sample_grid_per_silo:
            return
        grid = {}
        for silo in self.store.silos():
            desc, decoder = self.store.load_decoder(silo)
            grid[silo] = sample_generator(desc, decoder, c.sample_grid_per_silo, self.terms.class_ids(desc),
                                          c.sample_temperature, seed=server_round)
        self.recorder.save_sample_grid(server_round, grid)
