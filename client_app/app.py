"""The silo's Flower ClientApp. Train replies carry the decoder only; the encoder stays here, in the silo's own
folder (``<silo-dir>/state/<run>/``), so a restarted SuperNode or a resumed run continues its VAEs."""

from __future__ import annotations

import json
import traceback
from functools import lru_cache
from logging import ERROR

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log as flwr_log

from alignfl_app.config import ConfigError, parse_run_config
from alignfl_app.contract import records as P
from alignfl_app.contract.records import (
    PRIVACY_REFUSAL_ERROR,
    PRIVATE_FAILURE_ERROR,
    SILO_DATA_ERROR,
    STRATEGY_MISMATCH_ERROR,
)
from alignfl_app.data.folders import DataFolderError
from alignfl_app.privacy.errors import PrivacyRefusal
from alignfl_app.silo.core import Silo
from alignfl_app.silo.setup import silo_node_config
from alignfl_app.silo.state import SiloStateError, run_key

app = ClientApp()


@lru_cache(maxsize=4)
def _silo(run_config_json: str, node_config_json: str) -> Silo:
    """One Silo (data partition loaded once) per run and node, reused across rounds in this process; its name,
    folder and data come from its own side (silo_setup.py), never from the run config."""
    return Silo(parse_run_config(json.loads(run_config_json)), silo_node_config(json.loads(node_config_json)))


def silo_for(context: Context) -> Silo:
    return _silo(
        json.dumps(dict(context.run_config), sort_keys=True), json.dumps(dict(context.node_config), sort_keys=True)
    )


def unusable_silo(msg: Message, context: Context) -> Message | None:
    """An error reply whose one line names the problem when the silo cannot be set up (its data folder or its own
    config), else None; the SuperNode's log shows the same line."""
    try:
        silo_for(context)
    except (DataFolderError, ConfigError) as exc:
        flwr_log(ERROR, "alignfl silo: %s", exc)
        return Message(error=Error(code=SILO_DATA_ERROR, reason=str(exc)), reply_to=msg)
    return None


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Dispatch on the strategy named in the message config (ALIGN-FL when absent)."""
    unusable = unusable_silo(msg, context)
    if unusable is not None:
        return unusable
    strategy = str(msg.content[P.CONFIG].get(P.STRATEGY, "alignfl"))
    configured = silo_for(context).cfg.baselines.strategy
    if strategy != configured:  # the run config decides what a silo trains, not a message
        return Message(
            error=Error(
                code=STRATEGY_MISMATCH_ERROR,
                reason=(f"the train message asks for strategy '{strategy}' but the run config says '{configured}'"),
            ),
            reply_to=msg,
        )
    if strategy in ("fedavg", "fedprox"):
        return train_averaged_model(msg, context)
    return train_generator(msg, context)


def train_averaged_model(msg: Message, context: Context) -> Message:
    """FedAvg / FedProx: train the received global model (classifier or VAE) on local data; reply with all
    its weights."""
    silo = silo_for(context)
    config = msg.content[P.CONFIG]
    mu = float(config.get(P.PROXIMAL_MU, 0.0)) if config.get(P.STRATEGY) == "fedprox" else 0.0
    try:
        state, metrics = silo.train_global_model(
            int(config[P.SERVER_ROUND]), msg.content[P.GLOBAL_MODEL].to_torch_state_dict(), mu
        )
    except PrivacyRefusal as exc:
        return Message(error=Error(code=PRIVACY_REFUSAL_ERROR, reason=str(exc)), reply_to=msg)
    content = RecordDict(
        {
            P.GLOBAL_MODEL: ArrayRecord(torch_state_dict=state),
            P.METRICS: MetricRecord(metrics.record()),
            P.SILO: ConfigRecord({"name": silo.name}),
        }
    )
    return Message(content=content, reply_to=msg)


def train_generator(msg: Message, context: Context) -> Message:
    """ALIGN-FL: train the local generators for one round; reply with decoder weights + descriptor + metrics."""
    silo = silo_for(context)
    server_round = int(msg.content[P.CONFIG][P.SERVER_ROUND])
    try:
        # the run's identity: its run-name (a resumed run keeps it), else Flower's run id; its state, DP carry and
        # ledger entries live under it in the silo's own folder
        out = silo.continue_round(run_key(silo.cfg.run.run_name, context.run_id), server_round, str(context.run_id))
    except SiloStateError as exc:  # one line naming the file and the fix; never a silent reset
        flwr_log(ERROR, "alignfl silo: %s", exc)
        return Message(error=Error(code=SILO_DATA_ERROR, reason=str(exc)), reply_to=msg)
    except PrivacyRefusal as exc:  # a clear error reply; the server keeps the last generator
        return Message(error=Error(code=PRIVACY_REFUSAL_ERROR, reason=str(exc)), reply_to=msg)
    except Exception:
        if not silo.cfg.privacy.enabled:
            raise  # Flower's error reply carries the reason
        # under DP an exception's text could describe the records: the details stay on the silo
        silo.record_failure(server_round, traceback.format_exc())
        return Message(
            error=Error(
                code=PRIVATE_FAILURE_ERROR,
                reason=(f"silo '{silo.name}' failed in private round {server_round}; the details stay in its silo-dir"),
            ),
            reply_to=msg,
        )
    content = RecordDict(
        {
            P.DECODER: ArrayRecord(torch_state_dict=out.decoder_state),
            P.DESCRIPTOR: ConfigRecord({P.DESCRIPTOR_JSON: out.descriptor.model_dump_json()}),
            P.METRICS: MetricRecord(out.metrics.record()),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the server's global model on this silo's real held-out test set (refused under DP)."""
    unusable = unusable_silo(msg, context)
    if unusable is not None:
        return unusable
    silo = silo_for(context)
    kind = str(msg.content[P.CONFIG][P.GLOBAL_MODEL_KIND])
    try:
        metrics = silo.evaluate_global(kind, msg.content[P.GLOBAL_MODEL].to_torch_state_dict()).record()
    except PrivacyRefusal as exc:
        return Message(error=Error(code=PRIVACY_REFUSAL_ERROR, reason=str(exc)), reply_to=msg)
    content = RecordDict({P.METRICS: MetricRecord(metrics), P.SILO: ConfigRecord({"name": silo.name})})
    return Message(content=content, reply_to=msg)
