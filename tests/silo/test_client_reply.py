"""What leaves a silo: decoder tensors, a descriptor the server can rebuild from, metrics. No encoder."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict

from alignfl_app.config import CLASS_NAMES, IMAGE_SHAPE, load_architecture, parse_run_config
from alignfl_app.contract import records as P
from alignfl_app.contract.descriptor import GeneratorDescriptor, parse_descriptor
from alignfl_app.models.vae import VAE
from alignfl_app.server.store import GeneratorTerms, check_decoder_state
from client_app.app import app as client_app
from tests.conftest import make_context, make_message


def train_reply(config, partition_id, context=None, server_round=1):
    ctx = context or make_context(config, partition_id)
    msg = make_message(
        RecordDict({P.CONFIG: ConfigRecord({P.SERVER_ROUND: server_round})}), MessageType.TRAIN, src=1, dst=ctx.node_id
    )
    return client_app(msg, ctx), ctx


@pytest.mark.parametrize("partition_id", [0, 1])  # mlp-small and conv silos
def test_train_reply_carries_the_decoder_only(tiny_config, partition_id, tmp_path):
    reply, ctx = train_reply(tiny_config, partition_id)
    content = reply.content
    assert set(content.array_records) == {P.DECODER}
    keys = set(content[P.DECODER].keys())
    desc = parse_descriptor(content[P.DESCRIPTOR][P.DESCRIPTOR_JSON])
    vae = VAE(desc.architecture, desc.cond_dim, IMAGE_SHAPE)
    assert keys == set(vae.decoder.state_dict())
    assert not keys & {f"encoder.{k}" for k in vae.encoder.state_dict()} and not any("encoder" in k for k in keys)
    # the encoder exists and stays in the silo's own folder
    stored = (tmp_path / "silos" / f"silo-{partition_id}" / "state" / "1").glob("round-001.pt")
    assert any(".encoder." in k for k in torch.load(next(stored), weights_only=True)["generators"])
    # the decoder is rebuildable from the descriptor alone and passes the server's checks
    state = {k: a.numpy() for k, a in content[P.DECODER].items()}  # as the server reads it
    check_decoder_state(desc, state, GeneratorTerms.from_config(parse_run_config(tiny_config)))
    assert desc.classes == tuple(tiny_config["silo-classes"].split(";")[partition_id].split(","))
    assert desc.silo == f"silo-{partition_id}" and desc.layout == "conditional"
    metrics = content[P.METRICS]
    assert metrics["num-examples"] > 0 and np.isfinite(metrics["train-loss"])


def test_silo_keeps_training_its_own_vae_across_rounds(tiny_config):
    reply1, ctx = train_reply(tiny_config, 0)
    reply2, _ = train_reply(tiny_config, 0, context=ctx, server_round=2)
    w1 = reply1.content[P.DECODER].to_torch_state_dict()
    w2 = reply2.content[P.DECODER].to_torch_state_dict()
    assert any(not np.array_equal(w1[k], w2[k]) for k in w1)
    assert parse_descriptor(reply2.content[P.DESCRIPTOR][P.DESCRIPTOR_JSON]).round == 2


def test_node_config_picks_architecture_and_silo_name(tiny_config):
    ctx = make_context(tiny_config, 0, architecture="conv", **{"silo-name": "hospital-ct"})
    reply, _ = train_reply(tiny_config, 0, context=ctx)
    desc = json.loads(reply.content[P.DESCRIPTOR][P.DESCRIPTOR_JSON])
    assert desc["architecture"]["kind"] == "conv" and desc["silo"] == "hospital-ct"


@pytest.mark.parametrize("name", ["mlp", "conv", "mlp-small"])
def test_decoder_rebuilt_from_descriptor_reproduces_outputs(name):
    spec = load_architecture(name)
    vae = VAE(spec, 2, IMAGE_SHAPE)
    desc = GeneratorDescriptor(
        silo="s", architecture=spec, layout="conditional", classes=("3", "7"), image_shape=IMAGE_SHAPE, round=1
    )
    state = {k: v.numpy() for k, v in vae.decoder.state_dict().items()}
    rebuilt = check_decoder_state(
        parse_descriptor(desc.model_dump_json()),
        state,
        GeneratorTerms(IMAGE_SHAPE, desc.conditional, CLASS_NAMES["mnist"], 64 << 20, {"s": frozenset({"3", "7"})}),
    )
    z, y = torch.randn(5, spec.latent_dim), torch.eye(2)[torch.tensor([0, 1, 0, 1, 1])]
    vae.eval()
    assert torch.allclose(vae.decoder(z, y), rebuilt(z, y))


def test_evaluate_reply_reports_accuracy_on_local_test_set(tiny_config):
    from alignfl_app.models.global_model import GlobalModel

    ctx = make_context(tiny_config, 2)
    model = GlobalModel("classifier", 10)
    msg = make_message(
        RecordDict(
            {
                P.GLOBAL_MODEL: ArrayRecord(torch_state_dict=model.state()),
                P.CONFIG: ConfigRecord({P.GLOBAL_MODEL_KIND: "classifier", P.SERVER_ROUND: 1}),
            }
        ),
        MessageType.EVALUATE,
        src=1,
        dst=ctx.node_id,
    )
    metrics = client_app(msg, ctx).content[P.METRICS]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num-examples"] > 0
    assert len(metrics["per-class-accuracy"]) == 10


def test_audit_figure_stays_in_the_silos_own_folder(tiny_config, tmp_path):
    """The outlier audit's figure shows raw records: it is written into silo-dir, never next to the run's results."""
    from alignfl_app.config import parse_node_config, parse_run_config
    from alignfl_app.silo.core import Silo

    cfg = parse_run_config({**tiny_config, "num-server-rounds": 1})
    silo = Silo(cfg, parse_node_config({"partition-id": 0, "silo-dir": str(tmp_path / "hospital-a")}))
    metrics = silo.train_round("run", 1).metrics
    assert metrics.audit_mia_auc is not None
    assert (tmp_path / "hospital-a" / "audits" / "round-001.png").stat().st_size > 0
    assert not list(cfg.run.resolved_results_dir().rglob("*.png"))
