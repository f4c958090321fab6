"""AlignFLStrategy: a Flower Strategy that never averages weights.

Each round: ask every connected silo to train; check each reply (decoder tensors only, descriptor,
shapes, finiteness, size) and store it in the ``GeneratorStore``; then sample labelled synthetic data
from *every* stored generator (silos that missed the round included) and train the global model on
it. Clients may use different architectures, because decoders are rebuilt from their descriptors.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from alignfl_app import protocol as P
from alignfl_app.config import RunConfig
from alignfl_app.global_model import GlobalModel, cosine_lr
from alignfl_app.metrics import RunRecorder, peak_rss_mb
from alignfl_app.protocol import to_array_record
from alignfl_app.store import GeneratorStore, ReplyRejected, check_decoder_state, parse_descriptor
from alignfl_app.synthesis import sample_generator, synthesize
from alignfl_app.training import set_threads


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


def decode_train_reply(msg: Message, max_bytes: int, num_classes: int):
    """(descriptor, decoder state, metrics) of a train reply, or ReplyRejected naming the problem."""
    content = msg.content
    for key, kind in ((P.DECODER, ArrayRecord), (P.DESCRIPTOR, ConfigRecord)):
        if key not in content or not isinstance(content[key], kind):
            raise ReplyRejected(f"reply has no {kind.__name__} '{key}'")
    extra = sorted(k for k in content.array_records if k != P.DECODER)
    if extra:
        raise ReplyRejected(f"reply carries arrays beyond the decoder: {extra} (only '{P.DECODER}' is accepted)")
    record = content[P.DECODER]
    size = record.count_bytes()
    if size > max_bytes:
        raise ReplyRejected(f"decoder record is {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:.1f} MiB limit")
    text = content[P.DESCRIPTOR].get(P.DESCRIPTOR_JSON)
    if not isinstance(text, str):
        raise ReplyRejected(f"descriptor record has no string '{P.DESCRIPTOR_JSON}'")
    desc = parse_descriptor(text)
    state = {}
    for name, array in record.items():
        try:
            state[name] = array.numpy()
        except (TypeError, ValueError) as exc:
            raise ReplyRejected(f"tensor '{name}' is not a plain numpy array ({exc})") from exc
    check_decoder_state(desc, state, max_bytes, num_classes)
    raw = dict(content[P.METRICS]) if P.METRICS in content and isinstance(content[P.METRICS], MetricRecord) else {}
    # keep what a summary can hold: scalars and short lists (a client cannot bloat summary.json)
    metrics = {k: v for k, v in raw.items() if not isinstance(v, list) or len(v) <= 100}
    return desc, state, metrics, size


def declared_silo(msg: Message) -> str:
    """Name for a node not bound to a silo by a train reply: its declared name marked '?', else its node id."""
    declared = msg.content[P.SILO].get("name") if msg.has_content() and P.SILO in msg.content.config_records else None
    return f"{declared}?" if isinstance(declared, str) else f"node-{msg.metadata.src_node_id}"


def record_evaluate_replies(recorder: RunRecorder, server_round: int, replies: Iterable[Message],
                            silo_of_node: dict[int, str]) -> MetricRecord | None:
    """Record each silo's evaluation of the global model on its own real test set; weighted mean over silos.

    Shared by every strategy, so ALIGN-FL and the baselines are judged and named the same way: a node is
    named by the silo its train replies bound it to, else by ``declared_silo``.
    """
    total, weighted = 0, 0.0
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error() or P.METRICS not in msg.content:
            log(WARNING, "Evaluate reply from node %d failed: %s", node,
                msg.error.reason if msg.has_error() else "no metrics")
            continue
        m = dict(msg.content[P.METRICS])
        key = recorder.metric
        value, n = float(m.get(key, float("nan"))), int(m.get("num-examples", 0))
        record = recorder.silo(server_round, silo_of_node.get(node) or declared_silo(msg))
        record.update({f"eval-{key}": value, "eval-num-examples": n})
        if "per-class-accuracy" in m:
            record["eval-per-class-accuracy"] = list(m["per-class-accuracy"])
        total += n
        weighted += value * n
    if total == 0:
        return None
    return MetricRecord({"silo-mean-eval": weighted / total, "num-examples": total})


class AlignFLStrategy(Strategy):
    """Keeps every silo's latest generator and learns the global model from their samples."""

    def __init__(self, cfg: RunConfig, store: GeneratorStore, model: GlobalModel, recorder: RunRecorder) -> None:
        self.cfg, self.store, self.model, self.recorder = cfg, store, model, recorder
        self.silo_of_node: dict[int, str] = {}
        self.first_round = 1
        self.asked: dict[int, list[int]] = {}  # round -> nodes asked to train

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None, *,
              first_round: int = 1, after_round: Callable[[int], None] | None = None) -> Result:
        """Flower's round loop, able to start at ``first_round`` (resume) and to checkpoint via ``after_round``.

        Same order as ``Strategy.start``: train, client evaluation, server evaluation; then the hook.
        """
        self.first_round = first_round
        log(INFO, "Starting %s at round %d of %d", self.__class__.__name__, first_round, num_rounds)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result, arrays, t_start = Result(), initial_arrays, time.time()
        result.arrays = initial_arrays
        if evaluate_fn and first_round == 1:
            res = evaluate_fn(0, initial_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        for rnd in range(first_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", rnd, num_rounds)
            replies = grid.send_and_receive(messages=self.configure_train(rnd, arrays, train_config, grid),
                                            timeout=timeout)
            agg_arrays, train_metrics = self.aggregate_train(rnd, replies)
            if agg_arrays is not None:
                result.arrays = arrays = agg_arrays
            if train_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", train_metrics)
                result.train_metrics_clientapp[rnd] = train_metrics
            replies = grid.send_and_receive(messages=self.configure_evaluate(rnd, arrays, evaluate_config, grid),
                                            timeout=timeout)
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
        log(INFO, "\t├──> ALIGN-FL: %d silos, classes %s, architectures %s", c.num_silos, c.silo_classes,
            [c.architecture_for(i) for i in range(c.num_silos)])
        log(INFO, "\t├──> global model: %s, %d synthetic samples per silo, %d server epochs",
            c.global_model, c.synthetic_per_silo, c.server_epochs)
        log(INFO, "\t└──> generator store: %s (%d stored)", self.store.root, len(self.store))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Train instructions carry no weights: a silo's VAE never depends on others'."""
        wait = 120.0 if server_round == self.first_round else 5.0
        nodes = wait_for_nodes(grid, self.cfg.num_silos, wait)
        self.asked[server_round] = list(nodes)
        log(INFO, "configure_train: asking %d silos to train their VAEs", len(nodes))
        cfg = ConfigRecord({**dict(config), P.SERVER_ROUND: server_round})
        return [Message(RecordDict({P.CONFIG: cfg}), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Store every valid generator, then train the global model on samples from all of them."""
        rnd = self.recorder.round(server_round)
        accepted, rejected, replied = 0, [], set()
        max_bytes = int(self.cfg.max_decoder_mb * 2**20)
        for msg in replies:
            node = msg.metadata.src_node_id
            replied.add(node)
            if msg.has_error():
                rejected.append(f"node {node}: error reply: {msg.error.reason}")
                continue
            try:
                desc, state, metrics, size = decode_train_reply(msg, max_bytes, self.cfg.num_classes)
                owner = next((n for n, s in self.silo_of_node.items() if s == desc.silo and n != node), None)
                if owner is not None and not self.gone(owner, server_round):
                    raise ReplyRejected(f"silo name '{desc.silo}' is already served by node {owner}")
                if owner is not None:  # e.g. a resumed simulation, whose nodes get new ids
                    log(WARNING, "Silo '%s' is now served by node %d (node %d is no longer connected)",
                        desc.silo, node, owner)
                    del self.silo_of_node[owner]
                if self.silo_of_node.get(node, desc.silo) != desc.silo:
                    raise ReplyRejected(f"node switched silo name from '{self.silo_of_node[node]}' to '{desc.silo}'")
            except ReplyRejected as exc:
                rejected.append(f"node {node}: {exc}")
                continue
            except Exception as exc:  # a reply must never kill the round
                rejected.append(f"node {node}: unreadable reply ({type(exc).__name__}: {exc})")
                continue
            self.silo_of_node[node] = desc.silo
            self.store.put(desc, state, server_round)
            accepted += 1
            self.recorder.silo(server_round, desc.silo).update(
                {**metrics, "bytes-up": size, "bytes-down-train": 0,
                 "architecture": desc.architecture.name, "label-set": list(desc.label_set)})
        for reason in rejected:
            log(WARNING, "Rejected train reply from %s", reason)
        missing = [self.silo_of_node.get(n, f"node-{n}") for n in self.asked.get(server_round, []) if n not in replied]
        if missing:
            log(WARNING, "No train reply within round-timeout from %s (silo died or timed out); the round goes on",
                missing)
        stale = [s for s in self.store.silos() if self.store.entry(s)["stored_round"] != server_round]
        if stale:
            log(INFO, "Silos without a new generator this round (their stored one is used): %s", stale)
        rnd.update({"accepted-replies": accepted, "rejected-replies": rejected, "missing-replies": missing,
                    "stale-silos": stale,
                    "generators-used": self.store.silos()})
        if len(self.store) == 0:
            log(WARNING, "No generator stored yet; the global model is unchanged")
            self.recorder.write()
            return None, MetricRecord({"accepted-replies": accepted, "rejected-replies": len(rejected)})
        metrics = self.learn_global_model(server_round)
        rnd["server"] = metrics
        self.recorder.write()
        return to_array_record(self.model.state()), MetricRecord(
            {**metrics, "accepted-replies": accepted, "rejected-replies": len(rejected), "generators": len(self.store)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        nodes = list(grid.get_node_ids())
        cfg = ConfigRecord({**dict(config), P.SERVER_ROUND: server_round, P.GLOBAL_MODEL_KIND: self.cfg.global_model})
        size = arrays.count_bytes()
        for node in nodes:
            if node in self.silo_of_node:
                self.recorder.silo(server_round, self.silo_of_node[node])["bytes-down-eval"] = size
        return [Message(RecordDict({P.GLOBAL_MODEL: arrays, P.CONFIG: cfg}), dst_node_id=n,
                        message_type=MessageType.EVALUATE) for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-silo accuracy of the global model on each silo's own real test set."""
        return record_evaluate_replies(self.recorder, server_round, replies, self.silo_of_node)

    def gone(self, node: int, server_round: int) -> bool:
        """True when ``node`` was not connected when this round's train instructions went out."""
        return server_round in self.asked and node not in self.asked[server_round]

    # --- the server's own learning ---------------------------------------------------------
    def learn_global_model(self, server_round: int) -> dict[str, float]:
        """Fresh synthetic samples from every stored generator each server epoch; warm-started model."""
        c = self.cfg
        set_threads(c.server_threads)
        t0 = time.perf_counter()
        loss, n = float("nan"), 0
        for epoch in range(c.server_epochs):
            x, y, _ = synthesize(self.store, c.synthetic_per_silo, c.sample_temperature,
                                 seed=c.seed * 10007 + server_round * 101 + epoch)
            n += len(x)
            step = (server_round - 1) * c.server_epochs + epoch
            lr = cosine_lr(c.server_learning_rate, step, c.num_server_rounds * c.server_epochs)
            loss = self.model.fit(x, y, epochs=1, batch_size=c.server_batch_size, lr=lr,
                                  seed=c.seed + server_round * 1000 + epoch)
        if c.sample_grid_per_silo:
            grid = {}
            for silo in self.store.silos():
                desc, decoder = self.store.load_decoder(silo)
                grid[silo] = sample_generator(desc, decoder, c.sample_grid_per_silo, c.sample_temperature, seed=server_round)
            self.recorder.save_sample_grid(server_round, grid)
        seconds = time.perf_counter() - t0
        log(INFO, "Global %s trained on %d synthetic samples from %d generators in %.1fs (loss %.4f)",
            c.global_model, n, len(self.store), seconds, loss)
        return {"server-train-loss": loss, "synthetic-samples": n, "server-seconds": seconds,
                "server-peak-rss-mb": peak_rss_mb()}
