"""Baselines a user compares ALIGN-FL with: a real FedProx term, FedAvg/FedProx client replies, the
reference classifiers, class slices for many-silo layouts, and experiment files that load."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict

from alignfl_app.config import ConfigError, parse_run_config
from alignfl_app.contract import records as P
from alignfl_app.data.datasets import federation_silo_data
from alignfl_app.experiments import EXPERIMENTS_DIR, load_experiment
from alignfl_app.models.global_model import GlobalModel
from alignfl_app.models.vae import Classifier
from alignfl_app.reference import centralised, local_only
from alignfl_app.training import CrossEntropy, ProximalTerm, ShuffledBatches, Trainer, proximal_term
from client_app.app import app as client_app
from tests.conftest import PROJECT, make_context, make_message


def _distance(model, anchor):
    return float(proximal_term(model, anchor))


def test_proximal_term_pulls_weights_back_to_the_global_model():
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    start = Classifier(10).state_dict()
    drift = {}
    for mu in (0.0, 10.0):
        model = Classifier(10)
        model.load_state_dict(start)
        anchor = [p.detach().clone() for p in model.parameters()]
        hooks = [ProximalTerm(model, mu)] if mu else []
        batches = ShuffledBatches(16, 3)(len(x), torch.Generator().manual_seed(1))
        Trainer(CrossEntropy(), hooks=hooks).fit(model, (x, y), batches, torch.optim.Adam(model.parameters(), lr=1e-2))
        drift[mu] = _distance(model, anchor)
    assert drift[10.0] < 0.5 * drift[0.0], drift
    # the term has a gradient: (w - w0) * mu after a perturbation
    model = Classifier(10)
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    (0.5 * 2.0 * proximal_term(model, anchor)).backward()
    assert torch.allclose(next(model.parameters()).grad, torch.full_like(anchor[0], 2.0))


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_averaging_reply_carries_the_trained_classifier(tiny_config, strategy):
    cfg = parse_run_config({**tiny_config, "strategy": strategy})
    glob = GlobalModel("classifier", 10, seed=3)
    ctx = make_context({**tiny_config, "strategy": strategy}, 1)
    config = ConfigRecord({P.SERVER_ROUND: 1, P.STRATEGY: strategy, P.PROXIMAL_MU: 0.5})
    msg = make_message(
        RecordDict({P.GLOBAL_MODEL: ArrayRecord(torch_state_dict=glob.state()), P.CONFIG: config}),
        MessageType.TRAIN,
        src=1,
        dst=ctx.node_id,
    )
    reply = client_app(msg, ctx).content
    assert set(reply.array_records) == {P.GLOBAL_MODEL} and len(reply.metric_records) == 1
    state = reply[P.GLOBAL_MODEL].to_torch_state_dict()
    assert set(state) == set(glob.state())
    assert any(not torch.equal(state[k], v) for k, v in glob.state().items())  # it trained
    m = reply[P.METRICS]
    assert m["num-examples"] == 2 * cfg.data.max_per_class and m["samples-per-second"] > 0
    assert reply[P.SILO]["name"] == "silo-1"


def test_averaging_refuses_settings_it_would_ignore():
    with pytest.raises(ConfigError, match="set dp-epsilon=0"):
        load_experiment("mnist-fast", {"strategy": "fedavg", "dp-epsilon": 2.0})
    with pytest.raises(ConfigError, match="lipschitz='none'"):
        load_experiment("mnist-fast", {"strategy": "fedprox", "lipschitz": "gp", "lipschitz-weight": 0.1})


def test_fedprox_over_the_vae_trains_the_whole_global_vae(tiny_config):
    """global-model='vae': the silos train the server's VAE (all classes) and return all its weights."""
    cfg = {**tiny_config, "strategy": "fedprox", "global-model": "vae"}
    glob = GlobalModel("vae", 10, seed=3)
    ctx = make_context(cfg, 0)
    config = ConfigRecord({P.SERVER_ROUND: 1, P.STRATEGY: "fedprox", P.PROXIMAL_MU: 0.1})
    msg = make_message(
        RecordDict({P.GLOBAL_MODEL: ArrayRecord(torch_state_dict=glob.state()), P.CONFIG: config}),
        MessageType.TRAIN,
        src=1,
        dst=ctx.node_id,
    )
    reply = client_app(msg, ctx).content
    state = reply[P.GLOBAL_MODEL].to_torch_state_dict()
    assert set(state) == set(glob.state()) and any(k.startswith("encoder.") for k in state)
    assert any(not torch.equal(state[k], v) for k, v in glob.state().items())
    assert np.isfinite(reply[P.METRICS]["train-loss"])


def test_vae_proximal_term_keeps_weights_near_the_global_model(tiny_config):
    cfg = parse_run_config(tiny_config)
    data = federation_silo_data(cfg, 0)

    def drift(mu: float) -> float:
        model = GlobalModel("vae", 10, seed=5)
        start = [p.detach().clone() for p in model.model.parameters()]
        batches = ShuffledBatches(32, 2)(len(data.x_train), torch.Generator().manual_seed(0))
        hooks = [ProximalTerm(model.model, mu)] if mu else []
        model.fit((data.x_train, data.y_train), batches, 1e-2, hooks)
        return _distance(model.model, start)

    assert drift(100.0) < 0.5 * drift(0.0)


def test_reference_points_use_the_silo_partitions(tmp_path, tiny_config):
    cfg = parse_run_config({**tiny_config, "reference-epochs": 1})
    local = local_only(cfg, tmp_path / "local")
    central = centralised(cfg, tmp_path / "central")
    assert set(local["final-per-silo-accuracy"]) == {"silo-0", "silo-1", "silo-2"}
    silos = local["rounds"][0]["silos"]
    assert np.isclose(local["final-global-accuracy"], np.mean([s["global-accuracy"] for s in silos.values()]))
    # a silo that only saw classes 0,1 cannot recognise 9
    assert silos["silo-0"]["global-per-class-accuracy"][9] == 0.0
    assert central["rounds"][0]["server"]["num-examples"] == sum(s["num-examples"] for s in silos.values())
    for d in ("local", "central"):
        assert json.loads((tmp_path / d / "summary.json").read_text())["status"] == "completed"


def test_references_and_comparison_judge_a_global_vae_by_its_elbo(tmp_path, tiny_config):
    """global-model='vae': the references train the VAE and every table reads the negative ELBO."""
    from alignfl_app.tools.compare import write_comparison

    cfg = parse_run_config({**tiny_config, "reference-epochs": 1, "global-model": "vae"})
    summaries = {
        "local-only": local_only(cfg, tmp_path / "runs" / "local-only"),
        "centralised": centralised(cfg, tmp_path / "runs" / "centralised"),
    }
    local, central = summaries["local-only"], summaries["centralised"]
    assert "final-global-accuracy" not in local and set(local["final-per-silo-neg-elbo"]) == {
        "silo-0",
        "silo-1",
        "silo-2",
    }
    # pooled data models every class better than the mean silo that saw two classes
    assert 0 < central["final-global-neg-elbo"] < local["final-global-neg-elbo"]
    write_comparison("tiny", summaries, cfg, tmp_path)
    text = (tmp_path / "comparison.md").read_text()
    assert "## Final neg-elbo" in text and "Per-class accuracy" not in text
    assert "global-neg-elbo" in (tmp_path / "comparison.csv").read_text().splitlines()[0]


def test_slices_layout_splits_shared_classes(tiny_config):
    raw = {**tiny_config, "silo-classes": "0,1;0,1;0,1", "silo-layout": "slices", "outliers-per-silo": 0}
    with pytest.raises(ConfigError, match="disjoint.*silo-layout='slices'"):
        parse_run_config({**raw, "silo-layout": "disjoint"})
    cfg = parse_run_config({**raw, "max-per-class": 100000})
    xs = [federation_silo_data(cfg, k).x_train for k in range(3)]
    flat = torch.cat(xs).flatten(1)
    assert len(torch.unique(flat, dim=0)) == len(flat)  # no record in two silos
    assert abs(len(xs[0]) - len(xs[2])) <= 2


def test_experiment_files_are_valid_run_configs():
    """Each file works as `flwr run . --run-config conf/experiments/<name>.toml` (flwr's own parsing and
    fusing with pyproject's defaults, which rejects unknown keys) and passes our validation."""
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    names = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))
    assert {"mnist-paper", "fashion-mnist-paper", "mnist-fast"} <= set(names)
    for name in names:
        fused = get_fused_config_from_dir(PROJECT, parse_config_args([str(EXPERIMENTS_DIR / f"{name}.toml")]))
        assert parse_run_config(fused) == load_experiment(name)
    with pytest.raises(ConfigError, match="no experiment 'nope'"):
        load_experiment("nope")


def test_averaging_names_evaluate_replies_like_alignfl(tmp_path, tiny_config):
    """A node is named by the silo its train reply bound it to; an unbound node's declared name is marked '?'."""
    from flwr.app import MetricRecord

    from alignfl_app.server.metrics import RunRecorder
    from server_app.baselines import averaging_strategy

    cfg = parse_run_config({**tiny_config, "strategy": "fedavg"})
    recorder = RunRecorder(tmp_path / "run", {}, method="fedavg")
    strategy = averaging_strategy(cfg, recorder)
    state = GlobalModel("classifier", 10, seed=0).state()
    train = make_message(
        RecordDict(
            {
                P.GLOBAL_MODEL: ArrayRecord(torch_state_dict=state),
                P.METRICS: MetricRecord(
                    {
                        "num-examples": 10,
                        "num-outliers": 0,
                        "train-loss": 1.0,
                        "train-seconds": 1.0,
                        "samples-per-second": 10.0,
                        "model-bytes": 100,
                        "peak-rss-mb": 100.0,
                    }
                ),
                P.SILO: ConfigRecord({"name": "silo-0"}),
            }
        ),
        MessageType.TRAIN,
        src=7,
        dst=0,
    )
    strategy.aggregate_train(1, [train])

    def evaluate(node: int, declared: str):
        return make_message(
            RecordDict(
                {
                    P.METRICS: MetricRecord({"accuracy": 0.5, "num-examples": 4}),
                    P.SILO: ConfigRecord({"name": declared}),
                }
            ),
            MessageType.EVALUATE,
            src=node,
            dst=0,
        )

    metrics = strategy.aggregate_evaluate(1, [evaluate(7, "silo-9"), evaluate(8, "silo-3")])
    assert set(recorder.round(1)["silos"]) == {"silo-0", "silo-3?"}
    assert recorder.silo(1, "silo-0")["eval-accuracy"] == 0.5 and metrics["num-examples"] == 8
