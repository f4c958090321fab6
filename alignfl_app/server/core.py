"""The server's side of ALIGN-FL, free of Flower: who serves which silo, which generators are kept, and the
global model learned from their samples.

``server_app`` turns Flower messages into ``TrainReply`` objects and calls ``AlignFLServer``; everything
that decides (reply checks, silo binding, storing, synthesis, the global model's schedule and seeds) is here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from alignfl_app.config import ConfigError, RunConfig
from alignfl_app.contract.descriptor import parse_descriptor
from alignfl_app.contract.replies import ReplyRejected, train_metrics_schema
from alignfl_app.contract.sampling import SamplingStyle, sample_generator
from alignfl_app.devices import peak_rss_mb
from alignfl_app.models.global_model import GlobalModel
from alignfl_app.seeds import augment_seed, server_batches_seed, server_training_seed, synthesis_seed
from alignfl_app.server.augment import SyntheticAugmentation
from alignfl_app.server.checkpoint import Checkpoint
from alignfl_app.server.judging import GeneratorJudge
from alignfl_app.server.metrics import RunRecorder
from alignfl_app.server.operator import OperatorRequests
from alignfl_app.server.store import GeneratorStore, GeneratorTerms, check_decoder_state
from alignfl_app.server.synthesis import SyntheticBudget, synthesize
from alignfl_app.server.validation import HarmfulGenerator, LabelValidator
from alignfl_app.training import CrossEntropy, ShuffledBatches, set_threads

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
    """Which node serves which silo. The operator's ``silo-nodes`` (name -> node id, the id the SuperLink gave
    the silo's registered key) decides when given; otherwise a name is bound to the first node that sends a
    valid generator under it and then never moves for the run. A name outside the run's silos is never bound, and
    nothing changes unless every check of a reply passes."""

    names: tuple[str, ...] = ()
    operator: dict[int, str] = field(default_factory=dict)  # node -> silo, from silo-nodes
    silo_of_node: dict[int, str] = field(default_factory=dict)
    asked: dict[int, list[int]] = field(default_factory=dict)  # round -> nodes asked to train
    answered: dict[int, set[int]] = field(default_factory=dict)  # round -> nodes whose train reply was accepted
    checkpointed: dict[int, str] = field(default_factory=dict)  # a resumed run's bindings, until nodes connect

    @classmethod
    def from_config(cls, cfg: RunConfig) -> SiloRegistry:
        operator = {node: silo for silo, node in cfg.run.silo_nodes.items()}
        return cls(cfg.data.names, operator, dict(operator))

    def name_of(self, node: int) -> str | None:
        return self.silo_of_node.get(node)

    def check(self, server_round: int, node: int, silo: str) -> None:
        """Raise ReplyRejected (one line) if ``node`` may not serve ``silo`` in this round."""
        if server_round in self.asked and node not in self.asked[server_round]:
            raise ReplyRejected(f"node {node} was not asked to train in round {server_round}")
        if node in self.answered.get(server_round, ()):
            raise ReplyRejected(f"node {node} already sent its train reply for round {server_round}")
        if silo not in self.names:
            raise ReplyRejected(f"silo '{silo}' is not one of this run's silos {list(self.names)} (silo-names)")
        if self.operator:
            bound = self.operator.get(node)
            if bound != silo:
                raise ReplyRejected(
                    f"node {node} is not bound to silo '{silo}' by silo-nodes"
                    + (f" (it serves '{bound}')" if bound else "")
                )
            return
        bindings = {**self.checkpointed, **self.silo_of_node}  # a resume's bindings hold until nodes are asked
        current = bindings.get(node)
        if current is not None and current != silo:
            raise ReplyRejected(f"node {node} serves silo '{current}' and cannot switch to '{silo}'")
        owner = next((n for n, s in bindings.items() if s == silo and n != node), None)
        if owner is not None:
            raise ReplyRejected(
                f"silo name '{silo}' is bound to node {owner} for this run (names never move; the "
                "operator binds nodes with silo-nodes)"
            )

    def bind(self, server_round: int, node: int, silo: str) -> None:
        self.silo_of_node[node] = silo
        self.answered.setdefault(server_round, set()).add(node)

    def restore(self, silo_of_node: dict[int, str]) -> None:
        """Bindings of a resumed run: the operator's when given; otherwise the checkpoint's, kept as soon as one of
        their nodes is connected again (a deployment's registered SuperNodes keep their ids, so names stay where
        they were). Only when none of them is connected (a resumed simulation: new processes, new ids) are the
        names bound again by the first valid generators."""
        if not self.operator:
            self.checkpointed = {n: s for n, s in silo_of_node.items() if s in self.names}

    def to_ask(self, connected: list[int], excluded: set[str]) -> list[int]:
        """Connected nodes to send instructions to: the operator's nodes when given, never one whose silo is
        withdrawn or quarantined."""
        if self.checkpointed:
            if set(self.checkpointed) & set(connected):
                self.silo_of_node = {**self.checkpointed, **self.silo_of_node}
                log.info(
                    "Resumed: silo names stay bound to their checkpointed nodes %s",
                    {s: n for n, s in self.checkpointed.items()},
                )
            else:
                log.warning(
                    "Resumed without silo-nodes and none of the checkpointed nodes is connected (a new "
                    "simulation): silo names are bound again by the first valid generators"
                )
            self.checkpointed = {}
        nodes = [n for n in connected if n in self.operator] if self.operator else list(connected)
        return [n for n in nodes if self.silo_of_node.get(n) not in excluded]


@dataclass
class SiloStanding:
    """Silos out of the run: withdrawn by the operator or quarantined after their generator failed on the server.
    Their generator leaves the store, they are not asked again and their replies are refused."""

    withdrawn: dict[str, int] = field(default_factory=dict)  # silo -> round it was withdrawn at
    quarantined: dict[str, dict[str, Any]] = field(default_factory=dict)  # silo -> {"round", "reason"}

    def excluded(self) -> set[str]:
        return set(self.withdrawn) | set(self.quarantined)

    def refusal(self, silo: str) -> str | None:
        if silo in self.withdrawn:
            return f"silo '{silo}' was withdrawn by the operator in round {self.withdrawn[silo]}"
        if silo in self.quarantined:
            q = self.quarantined[silo]
            return f"silo '{silo}' is quarantined since round {q['round']} ({q['reason']})"
        return None


class GlobalLearner:
    """Trains the global model on fresh synthetic samples every server epoch, with a cosine learning-rate
    schedule over the whole run's server epochs (a stable final model); resumable at any round."""

    FLOOR = 0.01  # the schedule ends at 1% of server-learning-rate

    def __init__(self, cfg: RunConfig, model: GlobalModel, terms: GeneratorTerms) -> None:
        self.cfg, self.model, self.terms = cfg, model, terms
        self.pixels = cfg.features.spec.is_pixels
        self.augment = SyntheticAugmentation(cfg.server.augment)
        self.budget = SyntheticBudget(cfg.server.synthetic_per_silo, cfg.server.synthetic_total)
        self.style = SamplingStyle.of(cfg.server)
        self.objective = CrossEntropy(cfg.server.label_smoothing) if model.kind == "classifier" else model.objective
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

    def learn(self, store: GeneratorStore, server_round: int) -> RoundLearning:
        """The round's server epochs. A generator that fails to sample is left out and reported; an epoch whose
        loss or weights become non-finite rolls the model and its optimiser back to the round's start."""
        c = self.cfg
        set_threads(c.server.threads)
        t0 = time.perf_counter()
        loss, n, failed = float("nan"), 0, {}
        snapshot = self.model.snapshot()
        rolled_back = None
        for epoch in range(c.server.epochs):
            schedule = self._schedule((server_round - 1) * c.server.epochs + epoch)
            synthetic = synthesize(
                store,
                self.terms,
                self.budget,
                self.style,
                seed=lambda i, e=epoch: synthesis_seed(c.run.seed, server_round, e, i),
                device=self.model.device,
                exclude=frozenset(failed),
                encode=None if self.pixels else self.model.encode,
            )
            failed.update(synthetic.failed)
            if not len(synthetic.x):
                schedule.step()
                continue
            # image transforms apply to images: a feature-space run's samples are features already
            x = self.augment(synthetic.x, augment_seed(c.run.seed, server_round, epoch)) if self.pixels else synthetic.x
            n += len(x)
            generator = torch.Generator().manual_seed(server_batches_seed(c.run.seed, server_round, epoch))
            torch.manual_seed(server_training_seed(c.run.seed, server_round, epoch))
            report = self.model.fit(
                (x, synthetic.y),
                ShuffledBatches(c.server.batch_size, 1)(len(x), generator),
                c.server.learning_rate,
                objective=self.objective,
            )
            loss = report.loss
            schedule.step()
            if not math.isfinite(loss) or not self.model.finite():
                rolled_back = f"server epoch {epoch + 1}: loss or weights became non-finite"
                self.model.restore(snapshot)
                self.scheduler = None  # rebuilt at the next round's position
                break
        seconds = time.perf_counter() - t0
        if rolled_back:
            log.warning(
                "Round %d rolled back (%s): the global model and its optimiser are as before the round",
                server_round,
                rolled_back,
            )
        else:
            log.info(
                "Global %s trained on %d synthetic samples from %d generators in %.1fs (loss %.4f)",
                c.server.global_model,
                n,
                len(store) - len(failed),
                seconds,
                loss,
            )
        metrics = {
            "server-train-loss": loss if math.isfinite(loss) else None,
            "synthetic-samples": n,
            "server-seconds": seconds,
            "server-peak-rss-mb": peak_rss_mb(),
        }
        return RoundLearning(metrics, failed, rolled_back)


@dataclass
class RoundLearning:
    """What a round's server training did: its figures, generators that failed, and why it was rolled back."""

    metrics: dict[str, Any]
    failed: dict[str, str]
    rolled_back: str | None


MAX_REASONS = 50  # rejected or refused replies recorded per round (summary.json stays small under a flood)
MAX_REASON_CHARS = 300


def bounded(reasons: list[str]) -> list[str]:
    """At most MAX_REASONS one-line reasons of at most MAX_REASON_CHARS each, and how many were left out."""
    kept = [" ".join(r.split())[:MAX_REASON_CHARS] for r in reasons[:MAX_REASONS]]
    return kept + ([f"... and {len(reasons) - MAX_REASONS} more"] if len(reasons) > MAX_REASONS else [])


class AlignFLServer:
    """Keeps every silo's latest good generator and learns the global model from their samples."""

    def __init__(
        self,
        cfg: RunConfig,
        store: GeneratorStore,
        model: GlobalModel,
        recorder: RunRecorder,
        labels: LabelValidator | None = None,
    ) -> None:
        """``labels``: the server's labelled images, to check the classes every new generator draws."""
        self.cfg, self.store, self.model, self.recorder = cfg, store, model, recorder
        self.registry = SiloRegistry.from_config(cfg)
        self.standing = SiloStanding()
        self.terms = GeneratorTerms.from_config(cfg)
        encode = None if cfg.features.spec.is_pixels else model.encode
        self.judge = GeneratorJudge.from_config(cfg, self.terms, labels, encode)
        self.learner = GlobalLearner(cfg, model, self.terms)
        self.train_schema = train_metrics_schema(cfg.privacy.enabled)
        self.withdrawals = OperatorRequests(recorder.run_dir)

    def first_round(self, checkpoint: Checkpoint) -> int:
        """The first round to run: 1, or (resume) one past the checkpoint, whose state is loaded here. A run that
        stored generators but completed no round (stopped by a full disk, say) resumes at round 1 with them. Every
        stored generator is re-checked against this run's terms first: what is read back from disk is not trusted."""
        cfg = self.cfg
        if not cfg.run.resume:
            if checkpoint.exists() or len(self.store):
                raise ConfigError(
                    f"run-name '{cfg.run.run_name}' already holds a run ({checkpoint.dir.parent}): "
                    "set resume=true to continue it, or choose another run-name"
                )
            return 1
        state = checkpoint.load() if checkpoint.exists() or not len(self.store) else None
        if state is not None:
            checkpoint.check_compatible(state, cfg)
        self.store.check_against(self.terms)
        if state is None:
            log.warning(
                "Resuming a run that completed no round: round 1 again, with its %d stored generators %s",
                len(self.store),
                self.store.silos(),
            )
            self.recorder.resume(0)
            return 1
        self.model.load_state(checkpoint.load_model(state))
        self.registry.restore({int(k): v for k, v in state.silo_of_node.items()})
        self.standing = SiloStanding(dict(state.withdrawn), {k: dict(v) for k, v in state.quarantined.items()})
        self.recorder.resume(state.completed_round)
        self.record_standing()
        log.info(
            "Resuming after round %d: global model from the checkpoint, %d stored generators %s",
            state.completed_round,
            len(self.store),
            self.store.silos(),
        )
        return state.completed_round + 1

    def save_checkpoint(self, checkpoint: Checkpoint, completed_round: int) -> None:
        checkpoint.save(
            completed_round,
            self.model.state(),
            self.registry.silo_of_node,
            self.cfg,
            self.standing.withdrawn,
            self.standing.quarantined,
        )

    def nodes_to_ask(self, server_round: int, connected: list[int], owing: Collection[int] = ()) -> list[int]:
        """Apply the operator's withdrawals, then the nodes this round's instructions go to.

        ``owing``: nodes whose reply to an earlier round's instruction is still to come. They are not sent another
        one, but count as asked in this round: that reply is this round's from them when it comes."""
        for silo in self.withdrawals.withdrawn():
            if silo in self.registry.names and silo not in self.standing.withdrawn:
                self.standing.withdrawn[silo] = server_round
                self.store.remove(silo)
                log.warning("Silo '%s' withdrawn by the operator: its generator left the store", silo)
                self.record_standing()
        nodes = self.registry.to_ask(list(dict.fromkeys([*connected, *owing])), self.standing.excluded())
        self.registry.asked[server_round] = nodes
        return [n for n in nodes if n not in owing]

    def quarantine(self, silo: str, server_round: int, reason: str) -> None:
        self.standing.quarantined[silo] = {"round": server_round, "reason": reason}
        self.store.remove(silo)
        log.warning("Silo '%s' quarantined for the rest of the run: %s", silo, reason)
        self.record_standing()

    def record_standing(self) -> None:
        self.recorder.summary["withdrawn"] = dict(self.standing.withdrawn)
        self.recorder.summary["quarantined"] = dict(self.standing.quarantined)

    def accept(self, server_round: int, node: int, reply: TrainReply) -> str:
        """Check a reply and store its generator; ReplyRejected (one line) leaves every state as it was."""
        desc = parse_descriptor(reply.descriptor_json)
        refusal = self.standing.refusal(desc.silo)
        if refusal:
            raise ReplyRejected(refusal)
        self.registry.check(server_round, node, desc.silo)
        decoder = check_decoder_state(desc, reply.decoder, self.terms)
        try:
            judgement = self.judge.judge(desc, decoder, reply.decoder, self.store)
        except HarmfulGenerator as exc:
            self.quarantine(desc.silo, server_round, str(exc))
            raise
        metrics = self.train_schema.received(reply.metrics).record()
        if judgement.replay_of is None:
            self.store.put(desc, reply.decoder, server_round)
            self.judge.remember(desc.silo, judgement)
        else:
            log.warning(
                "Silo '%s' sent the same decoder as in round %d: nothing new is stored (stale)",
                desc.silo,
                judgement.replay_of,
            )
        self.registry.bind(server_round, node, desc.silo)
        self.recorder.silo(server_round, desc.silo).update(
            {
                **metrics,
                **({"replay-of-round": judgement.replay_of} if judgement.replay_of is not None else {}),
                **({"sample-spread-min": min(judgement.spread.values())} if judgement.spread else {}),
                **(judgement.labels.record() if judgement.labels else {}),
                "bytes-up": reply.nbytes,
                "bytes-down-train": 0,
                "architecture": desc.architecture.name,
                "layout": desc.layout,
                "classes": list(desc.classes),
            }
        )
        return desc.silo

    def finish_train_round(
        self, server_round: int, accepted: int, rejected: list[str], replied: set[int], refused: list[str] | None = None
    ) -> dict[str, float] | None:
        """Record the round; train the global model on samples from every stored generator (None: none yet).

        ``refused``: the silos' own refusals (privacy policy or ledger). When every silo asked refused, no silo
        can train any more: the run stops, naming them."""
        refused = refused or []
        for reason in rejected[:MAX_REASONS]:
            log.warning("Rejected train reply from %s", reason[:MAX_REASON_CHARS])
        for reason in refused[:MAX_REASONS]:
            log.warning("Refused by the silo: %s", reason[:MAX_REASON_CHARS])
        asked = self.registry.asked.get(server_round, [])
        if refused and accepted == 0 and not rejected and len(refused) >= len(asked):
            self.recorder.round(server_round).update({"refused": bounded(refused)})
            self.recorder.write()
            raise SilosRefused("every silo refused to train, so the run stops: " + " | ".join(bounded(refused)))
        missing = [self.registry.name_of(n) or f"node-{n}" for n in asked if n not in replied]
        if missing:
            log.warning(
                "No train reply in time from %s (the silo died, or is late: its reply counts when it comes); "
                "the round goes on",
                missing,
            )
        stale = [s for s in self.store.silos() if self.store.entry(s)["stored_round"] != server_round]
        if stale:
            log.info("Silos without a new generator this round (their stored one is used): %s", stale)
        rnd = self.recorder.round(server_round)
        rnd.update(
            {
                "accepted-replies": accepted,
                "rejected-replies": bounded(rejected),
                "refused": bounded(refused),
                "missing-replies": missing,
                "stale-silos": stale,
                "generators-used": self.store.silos(),
            }
        )
        if len(self.store) == 0:
            log.warning("No generator stored yet; the global model is unchanged")
            self.recorder.write()
            return None
        learning = self.learner.learn(self.store, server_round)
        for silo, reason in learning.failed.items():
            self.quarantine(silo, server_round, reason)
        if learning.failed:
            rnd["generators-used"] = self.store.silos()
        if learning.rolled_back:
            rnd["rolled-back"] = learning.rolled_back
        self.save_sample_grid(server_round)
        rnd["server"] = learning.metrics
        self.recorder.write()
        return learning.metrics

    def save_sample_grid(self, server_round: int) -> None:
        c = self.cfg.server
        if not c.sample_grid_per_silo:
            return
        grid = {}
        for silo in self.store.silos():
            try:
                desc, decoder = self.store.load_decoder(silo)
                grid[silo] = sample_generator(
                    desc,
                    decoder,
                    c.sample_grid_per_silo,
                    self.terms.class_ids(desc),
                    self.learner.style,
                    seed=server_round,
                    chunk=self.terms.sampling_chunk(desc),
                )
            except Exception as exc:  # a figure never stops the round; the generator already drew for training
                log.warning(
                    "No sample grid for silo '%s': %s",
                    silo,
                    str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
                )
        if grid:
            self.recorder.save_sample_grid(server_round, grid)
