"""Devices: the CPU by default where no GPU exists, CUDA where asked and available, one-line errors otherwise.

The training paths run on every device this machine has (the CPU everywhere, CUDA where torch sees a GPU), so
the same tests check the GPU path on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignfl_app.config import ConfigError, parse_node_config, parse_run_config
from alignfl_app.devices import resolve_device
from alignfl_app.models.global_model import GlobalModel
from alignfl_app.server.core import GlobalLearner
from alignfl_app.server.store import GeneratorStore, GeneratorTerms
from alignfl_app.silo.core import Silo

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PATHS = {
    "plain": {},
    "dp": {"dp-epsilon": 4.0, "dp-steps": 5, "dp-sample-rate": 0.2, "generator-layout": "per-class"},
    "spectral": {"lipschitz": "spectral", "lipschitz-target": 2.0},
    "gradient-penalty": {"lipschitz": "gp", "lipschitz-weight": 0.1},
}


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_cpu_without_a_gpu_and_an_explicit_cuda_is_refused_in_one_line(no_gpu):
    assert resolve_device("auto", "client-device") == torch.device("cpu")
    assert resolve_device("cpu", "client-device") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"server-device='cuda'.*set server-device='auto' or 'cpu'") as err:
        resolve_device("cuda", "server-device")
    assert "\n" not in str(err.value)


def test_a_silos_node_config_overrides_the_runs_client_device(tiny_config, no_gpu):
    cfg = parse_run_config({**tiny_config, "client-device": "cuda"})
    with pytest.raises(ConfigError, match="client-device='cuda'"):
        Silo(cfg, parse_node_config({"partition-id": 1}))
    silo = Silo(cfg, parse_node_config({"partition-id": 1, "client-device": "cpu"}))
    assert silo.device == torch.device("cpu") and silo.data.x_train.device == torch.device("cpu")


def test_an_unknown_device_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="client-device"):
        parse_run_config({"client-device": "tpu"})
    with pytest.raises(ConfigError, match="client-device"):
        parse_node_config({"partition-id": 0, "client-device": "gpu"})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_silo_trains_where_it_is_told_and_sends_cpu_tensors(tiny_config, device, path):
    cfg = parse_run_config({**tiny_config, **PATHS[path], "client-device": device, "audit": False})
    silo = Silo(cfg, parse_node_config({"partition-id": 1}))
    assert silo.data.x_train.device.type == device  # records moved once, batches cut on the device
    first = silo.train_round("run", 1)
    second = silo.train_round("run", 2, first.state)  # carries its VAEs (and DP state) from round to round
    for state in (second.decoder_state, second.state.generators):
        assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in state.values())
    assert any(not torch.equal(first.decoder_state[k], v) for k, v in second.decoder_state.items())


@pytest.mark.parametrize("device", DEVICES)
def test_the_server_samples_trains_and_judges_on_its_device(tiny_config, tmp_path, device):
    cfg = parse_run_config(
        {**tiny_config, "server-device": device, "server-augment": "affine,crop", "client-device": "cpu"}
    )
    store = GeneratorStore(tmp_path / "generators")
    for partition in range(2):
        out = Silo(cfg, parse_node_config({"partition-id": partition})).train_round("run", 1)
        store.put(out.descriptor, {k: v.numpy() for k, v in out.decoder_state.items()}, 1)
    model = GlobalModel.from_config(cfg, torch.device(device))
    before = model.state()
    metrics = GlobalLearner(cfg, model, GeneratorTerms.from_config(cfg)).learn(store, 1).metrics
    assert metrics["synthetic-samples"] == cfg.server.epochs * 2 * cfg.server.synthetic_per_silo
    assert all(p.device.type == device for p in model.model.parameters())
    after = model.state()
    assert all(t.device.type == "cpu" for t in after.values())
    assert any(not torch.equal(before[k], v) for k, v in after.items())
    x = torch.rand(50, 1, 28, 28)
    result = model.evaluate(x, torch.randint(0, 10, (50,)))
    assert 0.0 <= result["accuracy"] <= 1.0 and np.isfinite(result["loss"])


@pytest.mark.parametrize("device", DEVICES)
def test_weight_averaging_silos_train_the_global_model_on_their_device(tiny_config, device):
    cfg = parse_run_config({**tiny_config, "strategy": "fedavg", "client-device": device})
    silo = Silo(cfg, parse_node_config({"partition-id": 0}))
    start = GlobalModel.from_config(cfg).state()
    state, metrics = silo.train_global_model(1, start)
    assert all(t.device.type == "cpu" for t in state.values())
    assert metrics.num_examples == len(silo.data.x_train)
    assert silo.evaluate_global("classifier", state).num_examples == len(silo.data.x_test)
