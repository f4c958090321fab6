"""Shared fixtures: the app's run config as Flower would hand it over, and Message/Context builders."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import pytest
from flwr.app import Context, Message, Metadata, RecordDict

PROJECT = Path(__file__).resolve().parent.parent


def default_run_config() -> dict:
    """``[tool.flwr.app.config]`` exactly as Flower flattens it into ``context.run_config``."""
    return dict(tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


TINY = {
    "max-per-class": 60,
    "outliers-per-silo": 12,
    "local-epochs": 1,
    "batch-size": 32,
    "synthetic-per-silo": 40,
    "server-epochs": 1,
    "server-batch-size": 32,
    "sample-grid-per-silo": 4,
    "silo-classes": "0,1;2,3;4,5",
    "silo-architectures": "mlp-small;conv",
    "local-min-steps": 0,  # tests check behaviour, not quality: exactly local-epochs
    "server-validation-per-class": 0,  # a few steps draw near-noise: the label check has its own trained silos
}


def retrained(state: dict, rounds: int = 1) -> dict:
    """A decoder state as one more round of training leaves it (every weight moved a little): a silo that sends the
    very same bytes again is a replay, and the server stores nothing new."""
    return {k: (v * (1 + 1e-4 * rounds)).astype(v.dtype) for k, v in state.items()}


def tiny_run_config(results_dir: Path) -> dict:
    """A 3-silo run config small enough for unit tests (real MNIST, a few records per class)."""
    return {**default_run_config(), **TINY, "results-dir": str(results_dir)}


@pytest.fixture(autouse=True)
def own_silos_root(tmp_path, monkeypatch):
    """Every test's silos keep their folders under its own tmp_path (the runs it starts inherit it)."""
    monkeypatch.setenv("ALIGNFL_SILOS_ROOT", str(tmp_path / "silos"))


@pytest.fixture
def tiny_config(tmp_path) -> dict:
    return tiny_run_config(tmp_path / "results")


def make_message(content: RecordDict | None, message_type: str, src: int, dst: int, error=None) -> Message:
    """A Message as it arrives outside a run (explicit Metadata, like flwr's own tests)."""
    md = Metadata(
        run_id=1,
        message_id=f"m-{src}-{dst}-{time.time_ns()}",
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    if error is not None:
        return Message(error=error, metadata=md)
    return Message(content=content, metadata=md)


def make_context(run_config: dict, partition_id: int, node_id: int | None = None, **node_extra) -> Context:
    node_config = {"partition-id": partition_id, "num-partitions": 3, **node_extra}
    return Context(
        run_id=1,
        node_id=node_id or 100 + partition_id,
        node_config=node_config,
        state=RecordDict(),
        run_config=dict(run_config),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One round of real local training for each of the 3 tiny silos (descriptor, decoder state): real decoders
    that forged replies are built from."""
    from alignfl_app.config import parse_node_config, parse_run_config
    from alignfl_app.silo.core import Silo

    cfg = parse_run_config(tiny_run_config(tmp_path_factory.mktemp("results")))
    outs = {}
    with pytest.MonkeyPatch.context() as mp:  # a module's silos: never the machine's own silos folder
        mp.setenv("ALIGNFL_SILOS_ROOT", str(tmp_path_factory.mktemp("silos")))
        for s in range(3):
            out = Silo(cfg, parse_node_config({"partition-id": s})).train_round("run", 1)
            outs[s] = (out.descriptor, {k: v.numpy() for k, v in out.decoder_state.items()})
    return cfg, outs
