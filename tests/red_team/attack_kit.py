"""What every red-team module uses: forged replies built from real decoders, and checks that the server is
unharmed (one-line reasons, the store unchanged, the model finite and no worse than without the attacker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from alignfl_app.contract import records as P
from alignfl_app.models.global_model import GlobalModel
from alignfl_app.server.checkpoint import Checkpoint
from alignfl_app.server.core import AlignFLServer
from alignfl_app.server.metrics import RunRecorder
from alignfl_app.server.store import GeneratorStore
from server_app.strategy import AlignFLStrategy
from tests.conftest import make_message

NODE = {0: 1000, 1: 1001, 2: 1002}
METRICS = {
    "num-examples": 10,
    "num-outliers": 0,
    "train-seconds": 1.0,
    "samples-per-second": 10.0,
    "decoder-bytes": 100,
    "vae-bytes": 200,
    "peak-rss-mb": 100.0,
    "lipschitz-upper-bound": 5.0,
    "lipschitz-empirical": 1.0,
    "train-loss": 1.0,
}


def reply(node, desc, state, *, desc_json=None, extra_records=None, metrics=None, decoder_record=None):
    content = RecordDict(
        {
            P.DECODER: decoder_record
            if decoder_record is not None
            else ArrayRecord(array_dict={k: Array(np.asarray(v)) for k, v in state.items()}),
            P.DESCRIPTOR: ConfigRecord(
                {P.DESCRIPTOR_JSON: desc_json if desc_json is not None else desc.model_dump_json()}
            ),
            P.METRICS: MetricRecord(METRICS if metrics is None else metrics),
        }
    )
    for k, v in (extra_records or {}).items():
        content[k] = v
    return make_message(content, MessageType.TRAIN, src=node, dst=1)


def evaluate_msg(node, metrics, record_cls=MetricRecord, silo_name=None):
    content = RecordDict({P.METRICS: record_cls(metrics)})
    if silo_name is not None:
        content[P.SILO] = ConfigRecord({"name": silo_name})
    return make_message(content, MessageType.EVALUATE, src=node, dst=1)


def make_strategy(cfg, tmp_path: Path) -> AlignFLStrategy:
    return AlignFLStrategy(
        AlignFLServer(
            cfg,
            GeneratorStore(tmp_path / "generators"),
            GlobalModel.from_config(cfg),
            RunRecorder(tmp_path / "run", cfg.flat()),
        )
    )


def honest(outs, silos=(0, 1, 2)):
    return [reply(NODE[s], *outs[s]) for s in silos]


def checkpointed_round(cfg, outs, tmp_path: Path) -> tuple[AlignFLStrategy, Checkpoint]:
    """A strategy after one honest round, checkpointed as the ServerApp does after every round."""
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    ckpt = Checkpoint(tmp_path / "run")
    s.core.save_checkpoint(ckpt, 1)
    return s, ckpt


def store_snapshot(tmp_path: Path) -> dict[str, bytes]:
    root = tmp_path / "generators"
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.npz"))}


def index_entries(strategy) -> dict:
    return {s: strategy.core.store.entry(s) for s in strategy.core.store.silos()}


def one_line_reasons(reasons) -> None:
    assert reasons, "no reason recorded"
    for r in reasons:
        assert isinstance(r, str) and "\n" not in r and r.strip(), r


def model_finite(strategy) -> bool:
    return all(torch.isfinite(v).all() for v in strategy.core.model.state().values() if v.is_floating_point())


def accuracy(strategy, test_set) -> float:
    return float(strategy.core.model.evaluate(*test_set)["accuracy"])


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def attacked_round2(cfg, outs, tmp_path, attack_msgs, *, before_round2=None):
    """Round 1 honest; round 2 = attacker's messages first, then the honest replies. Returns the strategy."""
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    if before_round2:
        before_round2(s)
    s.aggregate_train(2, [*attack_msgs, *honest(outs)])
    return s


def assert_unharmed(s, tmp_path, before_npz, baseline, test_set, *, rejected_at_least=1, keyword=None):
    rnd = s.core.recorder.round(2)
    rejected = rnd["rejected-replies"]
    assert len(rejected) >= rejected_at_least, rnd
    one_line_reasons(rejected)
    if keyword:
        assert any(
            k.lower() in " ".join(rejected).lower() for k in ([keyword] if isinstance(keyword, str) else keyword)
        ), rejected
    assert s.core.store.silos() == ["silo-0", "silo-1", "silo-2"]
    # the honest round-2 replies were stored; nothing else changed
    assert set(store_snapshot(tmp_path)) == {"silo-0.npz", "silo-1.npz", "silo-2.npz"}
    assert store_snapshot(tmp_path) == before_npz
    assert model_finite(s)
    assert accuracy(s, test_set) >= baseline["accuracy"] - 1e-6
