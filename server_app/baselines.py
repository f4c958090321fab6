"""FedAvg and FedProx baselines: Flower's built-in strategies, recorded like ALIGN-FL.

The aggregation is Flower's own (``flwr.serverapp.strategy.FedAvg`` / ``FedProx``, weighted by
``num-examples``); this module only adds what a fair comparison needs: the same message keys the
ClientApp reads, the strategy name in the train config (the ClientApp dispatches on it), and the same
per-round records (per-silo train metrics, bytes up/down, per-silo evaluation) in ``RunRecorder``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from alignfl_app.config import RunConfig
from alignfl_app.contract import records as P
from alignfl_app.contract.replies import AveragedTrainMetrics, ReplyRejected
from alignfl_app.devices import peak_rss_mb
from alignfl_app.server.metrics import RunRecorder

from .messages import as_metric_record, evaluate_results


class RecordedAveraging:
    """Mixin over a Flower averaging strategy: record every round the way AlignFLStrategy does."""

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, **kwargs) -> None:
        n = cfg.data.num_silos
        super().__init__(
            min_train_nodes=n,
            min_evaluate_nodes=n,
            min_available_nodes=n,
            weighted_by_key="num-examples",
            arrayrecord_key=P.GLOBAL_MODEL,
            configrecord_key=P.CONFIG,
            **kwargs,
        )
        self.cfg, self.recorder = cfg, recorder
        self.silo_of_node: dict[int, str] = {}
        self.bytes_down = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[P.STRATEGY] = self.cfg.baselines.strategy
        self.bytes_down = arrays.count_bytes()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record and aggregate the replies whose metrics pass the schema; the others are logged and left out."""
        replies = list(replies)
        usable = []
        for msg in replies:
            if msg.has_error():
                continue
            try:
                name = msg.content[P.SILO]["name"]
                if not isinstance(name, str):
                    raise ReplyRejected("silo name is not a string")
                metrics = AveragedTrainMetrics.received(dict(msg.content[P.METRICS])).record()
                size = msg.content[P.GLOBAL_MODEL].count_bytes()
            except (ReplyRejected, KeyError, TypeError) as exc:
                log(WARNING, "Train reply from node %d left out: %s", msg.metadata.src_node_id, exc)
                continue
            usable.append(msg)
            self.silo_of_node[msg.metadata.src_node_id] = name
            self.recorder.silo(server_round, name).update(
                {**metrics, "bytes-up": size, "bytes-down-train": self.bytes_down}
            )
        t0 = time.perf_counter()
        arrays, metrics = super().aggregate_train(server_round, [m for m in replies if m.has_error()] + usable)
        rnd = self.recorder.round(server_round)
        rnd["accepted-replies"] = len(usable)
        rnd["server"] = {"server-seconds": time.perf_counter() - t0, "server-peak-rss-mb": peak_rss_mb()}
        self.recorder.write()
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[P.GLOBAL_MODEL_KIND] = self.cfg.server.global_model
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        size = arrays.count_bytes()
        for msg in messages:
            if msg.metadata.dst_node_id in self.silo_of_node:
                self.recorder.silo(server_round, self.silo_of_node[msg.metadata.dst_node_id])["bytes-down-eval"] = size
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        results = evaluate_results(replies, self.silo_of_node)
        return as_metric_record(self.recorder.record_evaluations(server_round, results))


class RecordedFedAvg(RecordedAveraging, FedAvg):
    """Flower's FedAvg over the global classifier."""


class RecordedFedProx(RecordedAveraging, FedProx):
    """Flower's FedProx (it puts ``proximal-mu`` in the train config; the silos add the proximal term)."""


def averaging_strategy(cfg: RunConfig, recorder: RunRecorder) -> FedAvg:
    if cfg.baselines.strategy == "fedprox":
        return RecordedFedProx(cfg, recorder, proximal_mu=cfg.baselines.proximal_mu)
    if cfg.baselines.strategy == "fedavg":
        return RecordedFedAvg(cfg, recorder)
    raise ValueError(f"strategy '{cfg.baselines.strategy}' is not an averaging strategy")
