"""Flower messages -> the server core's inputs. Shared by ALIGN-FL's strategy and the baselines."""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log

from alignfl_app.contract import records as P
from alignfl_app.contract.replies import EvaluateMetrics, ReplyRejected
from alignfl_app.server.core import TrainReply


def train_reply(msg: Message, max_bytes: int) -> TrainReply:
    """The parts of an ALIGN-FL train reply, or ReplyRejected naming what is missing or extra.

    The record's size is checked before any array is decoded; arrays are read without unpickling."""
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
    decoder = {}
    for name, array in record.items():
        try:
            decoder[name] = array.numpy()
        except (TypeError, ValueError) as exc:
            raise ReplyRejected(f"tensor '{name}' is not a plain numpy array ({exc})") from exc
    metrics = dict(content[P.METRICS]) if P.METRICS in content and isinstance(content[P.METRICS], MetricRecord) else {}
    return TrainReply(text, decoder, metrics, size)


def declared_silo(msg: Message) -> str:
    """Name for a node not bound to a silo by a train reply: its declared name marked '?', else its node id."""
    declared = msg.content[P.SILO].get("name") if msg.has_content() and P.SILO in msg.content.config_records else None
    return f"{declared}?" if isinstance(declared, str) else f"node-{msg.metadata.src_node_id}"


def evaluate_results(replies: Iterable[Message], silo_of_node: dict[int, str]) -> list[tuple[str, dict]]:
    """(silo name, checked metrics) of every usable evaluate reply; a node is named by the silo its train
    replies bound it to, else by ``declared_silo`` (the baselines' silos). A reply that fails the schema is logged
    and left out."""
    results = []
    for msg in replies:
        node = msg.metadata.src_node_id
        try:
            if msg.has_error():
                raise ReplyRejected(f"error reply: {msg.error.reason}")
            record = msg.content.get(P.METRICS)
            if not isinstance(record, MetricRecord):
                raise ReplyRejected(f"reply has no MetricRecord '{P.METRICS}'")
            metrics = EvaluateMetrics.received(dict(record)).record()
        except ReplyRejected as exc:
            log(WARNING, "Evaluate reply from node %d left out: %s", node, exc)
            continue
        results.append((silo_of_node.get(node) or declared_silo(msg), metrics))
    return results


def as_metric_record(metrics: dict | None) -> MetricRecord | None:
    return None if metrics is None else MetricRecord(metrics)
