"""AlignFLStrategy: a Flower Strategy that never averages weights; it only translates messages.

Each round: ask every connected silo to train; hand each reply to the Flower-free server core
(``alignfl_app.server.core``), which checks it (decoder tensors only, descriptor, shapes, finiteness, size),
stores its generator, and trains the global model on samples from *every* stored generator (silos
that missed the round included). Silos may use different architectures: decoders are rebuilt from
their descriptors.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import NamedTuple

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from alignfl_app.config import ConfigError
from alignfl_app.contract import records as P
from alignfl_app.contract.records import PRIVACY_REFUSAL_ERROR
from alignfl_app.contract.replies import ReplyRejected
from alignfl_app.files import StorageError
from alignfl_app.server.core import AlignFLServer
from alignfl_app.server.liveness import ReplyDeadline, grace_quorum

from .messages import as_metric_record, evaluate_results, train_reply


class LateReply(NamedTuple):
    """A reply that came after its phase stopped waiting for it."""

    message: Message
    server_round: int | None  # the round it answers


def asked_round(msg: Message) -> int | None:
    """The round an instruction asks for (what its late reply answers); None where it names none."""
    try:
        return int(msg.content[P.CONFIG][P.SERVER_ROUND])
    except (KeyError, TypeError, ValueError):
        return None


def take_late(msg: Message, deadline: ReplyDeadline, kept: list[LateReply] | None) -> None:
    """A reply to a message ``deadline`` stopped waiting for: its node's pace is learned, then it is kept in
    ``kept`` or, where None, discarded. Flower's own error reply (node offline, message expired) only ends the
    wait for it."""
    mid = msg.metadata.reply_to_message_id
    if msg.has_error() and msg.error.code in UNANSWERED:
        deadline.late.pop(mid)
        return
    owed = deadline.learn_late(mid, time.monotonic(), msg.metadata.created_at)
    if kept is not None:
        kept.append(LateReply(msg, owed.server_round))


def pull_late(grid: Grid, deadline: ReplyDeadline, kept: list[LateReply] | None = None) -> None:
    """Pull the late replies that came since the last phase (see ``take_late``), so that their nodes are free to
    be asked again."""
    deadline.owing(time.monotonic())
    if deadline.late:
        for msg in grid.pull_messages(list(deadline.late)):
            if msg.metadata.reply_to_message_id in deadline.late:
                take_late(msg, deadline, kept)


def collect_replies(
    grid: Grid,
    messages: Iterable[Message],
    deadline: ReplyDeadline,
    poll: float = 0.5,
    required: int = 0,
    queued: bool = False,
    late: list[LateReply] | None = None,
) -> list[Message]:
    """Push ``messages`` and pull their replies until all are in or ``deadline`` gives up on the rest: once the
    quorum of replies is in (``grace_quorum``: ``required`` = min-silos, ``queued``: a simulation), the rest get
    only a grace period (see ``alignfl_app.server.liveness``). Replies to an earlier phase that came too late are
    pulled too: learned from, then added to ``late`` or, where None, discarded."""
    messages = list(messages)
    deadline.owing(time.monotonic())
    if not messages:
        return []
    ids = list(grid.push_messages(messages))
    node_of = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages, strict=True)}
    round_of = {mid: asked_round(msg) for mid, msg in zip(ids, messages, strict=True)}
    pending, replies, arrived = set(ids), [], {}
    t0, wall0 = time.monotonic(), time.time()
    quorum = grace_quorum(len(ids), required, queued)
    while pending:
        for msg in grid.pull_messages([*pending, *deadline.late]):
            mid = msg.metadata.reply_to_message_id
            if mid in deadline.late:
                take_late(msg, deadline, late)
            elif mid in pending:
                pending.discard(mid)
                replies.append(msg)
                if not (msg.has_error() and msg.error.code in UNANSWERED):  # Flower's, not the node's
                    arrived[node_of[mid]] = time.monotonic() - t0
        if not pending:
            break
        elapsed = time.monotonic() - t0
        limit = deadline.limit((node_of[m] for m in pending), arrived, quorum)
        if elapsed >= limit:
            log(
                WARNING,
                "Stopped waiting for nodes %s after %.1f s (%s); a reply that still comes is pulled later",
                sorted(node_of[m] for m in pending),
                elapsed,
                f"{len(arrived)} replies in; the rest got the median reply time of those past the last one"
                if quorum and len(arrived) >= quorum
                else "round-timeout",
            )
            for m in pending:
                deadline.expect_late(m, node_of[m], t0, wall0, round_of[m])
            break
        time.sleep(min(poll, max(limit - elapsed, 0.0)))
    deadline.learn(arrived)
    return replies


def with_late(replies: list[Message], late: list[LateReply]) -> tuple[list[Message], dict[str, int | None]]:
    """This phase's replies and the late ones of nodes without a reply of their own here (a newer reply supersedes
    an older one: a silo never has two replies counted in one round), and ``{late reply's message id: the round
    it answers}``."""
    current = {m.metadata.src_node_id for m in replies if not (m.has_error() and m.error.code in UNANSWERED)}
    kept = []
    for entry in late:
        node = entry.message.metadata.src_node_id
        if node in current:
            log(INFO, "Node %d's reply to round %s is superseded by its newer one", node, entry.server_round)
        else:
            kept.append(entry)
    rounds = {e.message.metadata.reply_to_message_id: e.server_round for e in kept}
    return [*(e.message for e in kept), *replies], rounds


# Flower's own error replies: the node was offline or the message expired; no reply time to learn
UNANSWERED = frozenset({ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE})


def replies_queue(grid: Grid) -> bool:
    """Whether the silos share a few workers, so that their replies queue: a simulation (Flower's in-memory grid,
    Ray's workers). Its module is loaded only where one is in use."""
    module = sys.modules.get("flwr.superlink.grid.inmemory_grid")
    return module is not None and isinstance(grid, module.InMemoryGrid)


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    """Connected node ids, after waiting up to ``timeout`` s for ``wanted`` of them (never forever)."""
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < wanted and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    if len(nodes) < wanted:
        log(WARNING, "Only %d of %d silos connected; stored generators stand in for the rest", len(nodes), wanted)
    return nodes


class AlignFLStrategy(Strategy):
    """Keeps every silo's latest generator and learns the global model from their samples."""

    def __init__(self, core: AlignFLServer) -> None:
        self.core, self.cfg = core, core.cfg
        self.first_round = 1
        timeout = self.cfg.run.round_timeout
        self.train_deadline, self.evaluate_deadline = ReplyDeadline(timeout), ReplyDeadline(timeout)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
        after_round: Callable[[int], None] | None = None,
    ) -> Result:
        """Flower's round loop, able to start at ``first_round`` (resume) and to checkpoint via ``after_round``,
        and waiting for each phase's replies only as long as ``ReplyDeadline`` allows (``timeout`` at most). A
        train reply that comes after its phase stopped waiting counts in the round it is pulled in.

        Same order as ``Strategy.start``: train, client evaluation, server evaluation; then the hook.
        """
        self.first_round = first_round
        log(INFO, "Starting %s at round %d of %d", self.__class__.__name__, first_round, num_rounds)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result, arrays, t_start = Result(), initial_arrays, time.time()
        self.train_deadline, self.evaluate_deadline = ReplyDeadline(timeout), ReplyDeadline(timeout)
        queued = replies_queue(grid)
        if queued and not self.cfg.run.min_silos:
            log(INFO, "Simulation: every silo is waited for, up to round-timeout (min-silos gives the rest a grace)")
        result.arrays = initial_arrays
        if evaluate_fn and first_round == 1:
            res = evaluate_fn(0, initial_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        for rnd in range(first_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", rnd, num_rounds)
            required, late = self.cfg.run.min_silos, []  # 0: half of the silos asked
            pull_late(grid, self.train_deadline, late)  # replies that came since: their nodes are asked again
            replies = collect_replies(
                grid,
                self.configure_train(rnd, arrays, train_config, grid),
                self.train_deadline,
                required=required,
                queued=queued,
                late=late,
            )
            agg_arrays, train_metrics = self.aggregate_train(rnd, *with_late(replies, late))
            if agg_arrays is not None:
                result.arrays = arrays = agg_arrays
            if train_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", train_metrics)
                result.train_metrics_clientapp[rnd] = train_metrics
            pull_late(grid, self.evaluate_deadline)  # late evaluations are only learned from
            replies = collect_replies(
                grid,
                self.configure_evaluate(rnd, arrays, evaluate_config, grid),
                self.evaluate_deadline,
                required=required,
                queued=queued,
            )
            eval_metrics = self.aggregate_evaluate(rnd, replies)
            if eval_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", eval_metrics)
                result.evaluate_metrics_clientapp[rnd] = eval_metrics
            if evaluate_fn:
                res = evaluate_fn(rnd, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[rnd] = res
            if after_round:
                after_round(rnd)
        log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        return result

    # --- Strategy interface -------------------------------------------------------------
    def summary(self) -> None:
        c = self.cfg
        log(
            INFO,
            "\t├──> ALIGN-FL: %d silos, classes %s, architectures %s",
            c.data.num_silos,
            c.flat()["silo-classes"],
            [c.local.architecture_for(i) for i in range(c.data.num_silos)],
        )
        budget = (
            f"{c.server.synthetic_total} synthetic samples in all"
            if c.server.synthetic_total
            else f"{c.server.synthetic_per_silo} synthetic samples per silo"
        )
        log(INFO, "\t├──> global model: %s, %s, %d server epochs", c.server.global_model, budget, c.server.epochs)
        log(INFO, "\t└──> generator store: %s (%d stored)", self.core.store.root, len(self.core.store))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Train instructions carry no weights: a silo's VAE never depends on others'. The run's first round
        waits (bounded) for the silos and stops, naming the fix, if fewer than ``min-silos`` came. A node that
        still owes its last train reply is not asked again: that reply counts in this round when it comes."""
        starting = server_round == self.first_round
        wait = min(120.0, self.cfg.run.round_timeout) if starting else 5.0
        configured = self.cfg.data.num_silos
        owing = self.train_deadline.owing(time.monotonic())
        nodes = self.core.nodes_to_ask(server_round, wait_for_nodes(grid, configured, wait), owing)
        if owing:
            log(INFO, "configure_train: nodes %s still owe their last train reply; not asked again", sorted(owing))
        if starting and len(nodes) < self.cfg.required_silos:
            raise ConfigError(
                f"only {len(nodes)} of the {configured} configured silos connected within {wait:.0f} s (min-silos="
                f"{self.cfg.required_silos}): start the missing SuperNodes; in a simulation give Flower "
                f"num-supernodes={configured} (flwr run . --federation-config 'num-supernodes={configured}'); "
                "or lower min-silos"
            )
        log(INFO, "configure_train: asking %d silos to train their generators", len(nodes))
        cfg = ConfigRecord({**dict(config), P.SERVER_ROUND: server_round})
        return [Message(RecordDict({P.CONFIG: cfg}), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message], late: Mapping[str, int | None] | None = None
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hand every reply to the server core; the global model it then trains is the round's result.

        ``late``: ``{message id: round it answers}`` of the replies to an earlier round (see ``with_late``); they
        count in this round, and their silo's record says ``reply-to-round``."""
        late = late or {}
        accepted, rejected, refused, replied = 0, [], [], set()
        max_bytes = self.core.terms.max_bytes
        for msg in replies:
            node = msg.metadata.src_node_id
            replied.add(node)
            if msg.has_error():
                if msg.error.code == PRIVACY_REFUSAL_ERROR:
                    refused.append(f"node {node}: {msg.error.reason}")
                else:
                    rejected.append(f"node {node}: error reply: {msg.error.reason}")
                continue
            try:
                silo = self.core.accept(server_round, node, train_reply(msg, max_bytes))
            except ReplyRejected as exc:
                rejected.append(f"node {node}: {exc}")
                continue
            except StorageError:  # the server's own disk, not the reply: the run stops, its checkpoint intact
                raise
            except Exception as exc:  # a reply must never kill the round
                rejected.append(f"node {node}: unreadable reply ({type(exc).__name__}: {exc})")
                continue
            if msg.metadata.reply_to_message_id in late:
                self.core.recorder.silo(server_round, silo)["reply-to-round"] = late[msg.metadata.reply_to_message_id]
            accepted += 1
        metrics = self.core.finish_train_round(server_round, accepted, rejected, replied, refused)
        counts = {"accepted-replies": accepted, "rejected-replies": len(rejected)}
        if metrics is None:
            return None, MetricRecord(counts)
        figures = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        return ArrayRecord(torch_state_dict=self.core.model.state()), MetricRecord(
            {**figures, **counts, "generators": len(self.core.store)}
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask every silo to judge the global model on its own test set; none in a DP run (a silo's evaluation
        is a figure of its records: it would not be private). Not a node that still owes a reply (it is still
        training, or evaluating an older model)."""
        if self.cfg.privacy.enabled:
            return []
        registry, now = self.core.registry, time.monotonic()
        owing = self.train_deadline.owing(now) | self.evaluate_deadline.owing(now)
        nodes = [
            n
            for n in registry.to_ask(list(grid.get_node_ids()), self.core.standing.excluded())
            if registry.name_of(n) and n not in owing
        ]  # only nodes bound to a silo: an evaluation is recorded under its name
        cfg = ConfigRecord(
            {**dict(config), P.SERVER_ROUND: server_round, P.GLOBAL_MODEL_KIND: self.cfg.server.global_model}
        )
        size = arrays.count_bytes()
        for node in nodes:
            silo = self.core.registry.name_of(node)
            if silo:
                self.core.recorder.silo(server_round, silo)["bytes-down-eval"] = size
        return [
            Message(
                RecordDict({P.GLOBAL_MODEL: arrays, P.CONFIG: cfg}), dst_node_id=n, message_type=MessageType.EVALUATE
            )
            for n in nodes
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-silo accuracy of the global model on each silo's own real test set: one reply per node, and only
        from nodes bound to a silo (an evaluation is recorded under the silo's name)."""
        registry, seen, kept = self.core.registry, set(), []
        for msg in replies:
            node = msg.metadata.src_node_id
            if registry.name_of(node) is None or node in seen:
                log(
                    WARNING,
                    "Evaluate reply from node %d left out: %s",
                    node,
                    "a second reply this round" if node in seen else "the node serves no silo of this run",
                )
                continue
            seen.add(node)
            kept.append(msg)
        results = evaluate_results(kept, registry.silo_of_node)
        return as_metric_record(self.core.recorder.record_evaluations(server_round, results))
